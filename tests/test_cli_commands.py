"""The one `diffinstruct` command: its subcommands, the old module entry points that run them, and one exit-status
convention for all of them (0 done, 2 bad usage or input, 1 failed while running, 130 interrupted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffinstruct import cli

pytestmark = pytest.mark.usefixtures("one_thread")

SUBCOMMANDS = ["train", "sample", "eval", "preference", "embed", "comfyui", "demo", "convert", "build-weights"]
TOY = ('[run]\nproblem = "toy2d"\nsteps = 2\nout_dir = "{out}"\ncheckpoint_every = 2\n'
       "[train]\nbatch_size = 16\n[toy2d]\nhidden = 8\n")


def toy_config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY.replace("{out}", str(tmp_path / "out")))
    return path


def status(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_parser_holds_every_subcommand():
    sub = next(a for a in cli.make_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [*SUBCOMMANDS[:3], "evaluate", *SUBCOMMANDS[3:]]
    assert sub.choices["evaluate"] is sub.choices["eval"]  # one command, two spellings
    assert set(cli.COMMANDS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", [[], ["nonsense"], *[[name] for name in SUBCOMMANDS if name != "demo"],
                                  ["train", "--config", "x.toml", "--steps", "0"], ["eval", "--checkpoint", "x",
                                                                                  "--seed", "-1"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage: diffinstruct" in capsys.readouterr().err


def test_train_diverged_exits_1(tmp_path, capsys, monkeypatch):
    from diffinstruct import runner
    from diffinstruct.errors import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("3 non-finite steps in a row")

    monkeypatch.setattr(runner, "run", diverge)
    code, _, err = status(["train", "--config", str(toy_config(tmp_path)), "--no-progress"], capsys)
    assert code == 1 and err == "error: training diverged: 3 non-finite steps in a row\n"


def test_eval_is_one_command_for_both_reports(tmp_path, capsys):
    config = toy_config(tmp_path)
    assert status(["train", "--config", str(config), "--no-progress"], capsys)[0] == 0
    code, out, _ = status(["eval", "--checkpoint", str(tmp_path / "out")], capsys)
    assert code == 0 and json.loads(out)["n"] == 1000  # the problem's own metrics, on 1000 samples by default
    # the options of reward statistics are refused without --images / --prompts rather than ignored
    code, _, err = status(["eval", "--checkpoint", str(tmp_path / "out"), "--batch", "4", "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: --batch, --device: only for reward statistics"), err
    # --metrics (or --prompts) asks for reward statistics; the old spelling always does
    for argv in (["eval", "--checkpoint", str(tmp_path / "out"), "--metrics", "brightness"],
                 ["evaluate", "--checkpoint", str(tmp_path / "out")]):
        code, _, err = status(argv, capsys)
        assert code == 2 and "--checkpoint needs --prompts" in err, err


def test_input_and_runtime_errors_of_the_other_subcommands(tmp_path, capsys, monkeypatch):
    # comfyui: not a ComfyUI folder is bad input (2); a file where custom_nodes/ must go fails the write (1)
    assert status(["comfyui", "install", "--comfyui", str(tmp_path / "nowhere")], capsys)[0] == 2
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "main.py").write_text("")
    (tmp_path / "comfy" / "custom_nodes").write_text("not a folder")
    code, _, err = status(["comfyui", "install", "--comfyui", str(tmp_path / "comfy")], capsys)
    assert code == 1 and err.startswith("error: "), err
    # convert: a missing input is 2; an output that cannot be written is 1
    assert status(["convert", str(tmp_path / "none.pth"), str(tmp_path / "o.safetensors")], capsys)[0] == 2
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pth")
    code, _, err = status(["convert", str(tmp_path / "w.pth"), str(tmp_path / "comfy" / "custom_nodes" / "o.st")],
                          capsys)
    assert code == 1 and err.startswith("error: "), err
    # preference: an --out that is not .safetensors is bad usage
    pairs = tmp_path / "pairs.safetensors"
    from safetensors.torch import save_file

    save_file({"image_a": torch.rand(4, 3, 8, 8), "image_b": torch.rand(4, 3, 8, 8), "label": torch.ones(4)}, pairs)
    code, _, err = status(["preference", "train", "--pairs", str(pairs), "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and ".safetensors" in err, err
    # demo: a failure to write while running is 1 (its bad settings are 2: test_tiny_demo)
    from diffinstruct.tiny import demo

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "run_demo", no_space)
    code, _, err = status(["demo", "--out", str(tmp_path / "d"), "--quick"], capsys)
    assert code == 1 and "No space left" in err, err
    # build-weights: the shipped folder as --out, or a step count below 1, is bad usage
    from diffinstruct.tiny import models

    assert status(["build-weights", "--out", str(models.WEIGHTS_DIR)], capsys)[0] == 2
    code, _, err = status(["build-weights", "--out", str(tmp_path / "w"), "--teacher-steps", "0"], capsys)
    assert code == 2 and err == "error: --teacher-steps must be >= 1\n", err


def test_unexpected_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from diffinstruct.run import toy2d

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    config = toy_config(tmp_path)
    assert status(["train", "--config", str(config), "--no-progress"], capsys)[0] == 0
    monkeypatch.setattr(toy2d.Toy2D, "evaluate", broken)
    with pytest.raises(ZeroDivisionError):  # Python then exits with status 1 and prints the traceback
        cli.main(["eval", "--checkpoint", str(tmp_path / "out")])


def test_embed_dtype_choices_are_the_modules():
    pytest.importorskip("transformers")
    from diffinstruct.hosts import diffusers_embed

    assert cli.EMBED_DTYPES == tuple(diffusers_embed.DTYPES)


@pytest.mark.parametrize("module, args, code, needle", [
    ("diffinstruct", ["eval", "--help"], 0, "usage: diffinstruct eval"),
    ("diffinstruct.rewards.preference", ["train", "--pairs", "{tmp}/none.jsonl", "--out", "{tmp}/m.safetensors"], 2,
     "pairs not found"),
    ("diffinstruct.rewards.convert", ["{tmp}/none.pth", "{tmp}/o.safetensors"], 2, "weight file not found"),
    ("diffinstruct.comfyui", ["install", "--comfyui", "{tmp}/nowhere"], 2, "is not a folder"),
    ("diffinstruct.tiny.demo", ["--quick", "--di-steps", "0", "--out", "{tmp}/d"], 2, "di_steps must be"),
    ("diffinstruct.tiny.build_weights", ["--out", "{tmp}/w", "--seed", "-1"], 2, "--seed must be >= 0"),
    ("diffinstruct.hosts.diffusers_embed", ["--help"], 0, "usage: diffinstruct embed"),
])
def test_old_module_entry_points_run_the_same_subcommand(tmp_path, module, args, code, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stderr
