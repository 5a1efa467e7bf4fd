"""The command line: bad configs exit 2 naming the key before any work; train / sample / eval on a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from diffinstruct import cli

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "run": 'problem = "toy2d"\nsteps = 12\nout_dir = "{out}"\ncheckpoint_every = 5\nkeep = 2\nseed = 1\n'
           "eval_every = 6\neval_samples = 200",
    "train": "batch_size = 32\nlr_generator = 1e-3\nlr_ta = 1e-3\nalpha = 0.1",
    "toy2d": "classes = 3\nhidden = 16",
    "reward": 'name = "target"\ntarget = [1.0, 1.0]',
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(tmp_path: Path, sections: dict[str, str] | None = None, extra: str = "") -> Path:
    body = "\n".join(f"[{name}]\n{text}\n" for name, text in (sections or GOOD).items())
    path = tmp_path / "run.toml"
    path.write_text(body.replace("{out}", str(tmp_path / "out")) + extra)
    return path


def with_line(section: str, line: str) -> dict[str, str]:
    """GOOD with `line` ("key = value") set in `section`, replacing that key if present."""
    key = line.split("=")[0].strip()
    kept = [ln for ln in GOOD.get(section, "").splitlines() if ln.split("=")[0].strip() != key]
    return {**GOOD, section: "\n".join([*kept, line])}


def without_key(section: str, key: str) -> dict[str, str]:
    lines = [ln for ln in GOOD[section].splitlines() if not ln.startswith(f"{key} ")]
    return {**GOOD, section: "\n".join(lines)}


BAD = {
    "unknown section": ({**GOOD, "optim": "lr = 1"}, ["[optim]", "valid sections", "toy2d"]),
    "unknown run key": (with_line("run", "stepz = 3"), ["stepz", "valid keys", "checkpoint_every"]),
    "unknown train key": (with_line("train", "lr = 0.1"), ["lr", "lr_generator"]),
    "unknown toy2d key": (with_line("toy2d", "width = 3"), ["width", "hidden"]),
    "wrong type train": (with_line("train", 'ema_decay = "high"'), ["[train] ema_decay", "a number"]),
    "wrong type bool as int": (with_line("toy2d", "classes = true"), ["[toy2d] classes", "an integer"]),
    "wrong type float as int": (with_line("toy2d", "hidden = 1.5"), ["[toy2d] hidden", "an integer"]),
    "wrong type bf16": (with_line("train", "bf16 = 1"), ["[train] bf16", "true or false"]),
    "out of range train": (with_line("train", "ema_decay = 2.0"), ["ema_decay", "<= 1"]),
    "out of range toy2d": (with_line("toy2d", "classes = 0"), ["[toy2d] classes", ">= 1"]),
    "out of range run": (with_line("run", "keep = -1"), ["[run] keep", ">= 0"]),
    "bad choice": (with_line("train", 'method = "gan"'), ["method", "di, dipp, distar"]),
    "bad problem": (with_line("run", 'problem = "sdxl"'), ["[run] problem", "toy2d"]),
    "missing required": (without_key("run", "steps"), ["[run] steps is required"]),
    "missing run section": ({k: v for k, v in GOOD.items() if k != "run"}, ["missing section [run]"]),
    "bad reward": ({**GOOD, "reward": 'name = "aesthetic"'}, ["[reward] name", "none, target"]),
    "reward key missing": ({**GOOD, "reward": 'name = "target"'}, ["[reward] target is required"]),
    "reward wrong length": ({**GOOD, "reward": 'name = "target"\ntarget = [1.0, 2.0, 3.0]'},
                            ["[reward] target", "2 numbers"]),
    "alpha without reward": ({**GOOD, "reward": 'name = "none"'}, ["alpha", "needs a reward", "target"]),
    "sigma_init twice": ({**with_line("toy2d", "sigma_init = 2.0"), "train": with_line("train", "sigma_init = 1.0")[
        "train"]}, ["sigma_init", "[toy2d]", "[train]"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, case):
    sections, needles = BAD[case]
    path = write_config(tmp_path, sections)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_missing_and_malformed_files(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err
    path = tmp_path / "broken.toml"
    path.write_text("[run]\nsteps = = 3\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "s.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.txt")]) == 2
    assert ".npy or .safetensors" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    path = write_config(tmp_path, with_line("train", "lr_ta = -1.0"))
    proc = subprocess.run([sys.executable, "-m", "diffinstruct", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "lr_ta" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_example_config_is_valid():
    spec = cli.load_config(ROOT / "examples" / "toy2d.toml")
    assert spec.problem == "toy2d" and spec.reward["name"] == "target"
    assert spec.train.seed == spec.seed  # [train] seed defaults to [run] seed


def test_train_sample_eval(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(config), "--no-progress", "--steps", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 8 and summary["checkpoint"].endswith("step-000008")
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 2  # would overwrite the run
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config), "--no-progress", "--resume"]) == 0  # to [run] steps = 12
    summary = json.loads(capsys.readouterr().out)
    assert (summary["start_step"], summary["completed"]) == (8, 12)
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [6, 8, 12]
    assert summary["eval"]["mmd"] >= 0 and "reward_mean" in summary["eval"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted(out.glob("step-*"))] == ["step-000010", "step-000012"]

    assert cli.main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "pts.npy"), "--n", "90"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 12 and result["weights"] == "ema"
    points = np.load(tmp_path / "pts.npy")
    assert points.shape == (90, 2) and np.isfinite(points).all()
    assert (tmp_path / "pts.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["sample", "--checkpoint", str(out / "step-000010"), "--out", str(tmp_path / "s.safetensors"),
                     "--n", "30", "--weights", "generator"]) == 0
    capsys.readouterr()
    saved = load_file(tmp_path / "s.safetensors")
    assert saved["samples"].shape == (30, 2) and saved["labels"].tolist() == [i % 3 for i in range(30)]

    assert cli.main(["eval", "--checkpoint", str(out), "--n", "300", "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 12 and report["method"] == "dipp" and report["alpha"] == 0.1
    assert len(report["per_class_mean_distance"]) == 3 and report["mmd"] >= 0
    assert report["reward_mean"] < 0 and json.loads((tmp_path / "e.json").read_text()) == report
    # EMA and raw weights differ, and evaluation is deterministic for a seed
    assert cli.main(["eval", "--checkpoint", str(out), "--n", "300", "--weights", "generator"]) == 0
    assert json.loads(capsys.readouterr().out)["mmd"] != report["mmd"]
    assert cli.main(["eval", "--checkpoint", str(out), "--n", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["mmd"] == report["mmd"]
