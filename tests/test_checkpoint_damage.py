"""Checkpoints damaged by hand (issue 10): skipped with a warning naming the file and the reason, the newest
usable one resumed exactly; when none is usable, resuming stops (exit status 2) and says so, without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffinstruct import checkpoint as ckpt
from diffinstruct import cli, runner
from diffinstruct.comfyui import training as comfy_train
from diffinstruct.config import DIConfig
from diffinstruct.errors import CheckpointDamaged, CheckpointDamagedWarning, ConfigError, NoUsableCheckpoint
from diffinstruct.metrics import read_jsonl, without_timing
from diffinstruct.rewards import TargetReward
from diffinstruct.toy import GaussianMixture, build_models, class_prompts, default_means
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state

pytestmark = pytest.mark.usefixtures("one_thread")

Meta = dict[str, Any]


def make_trainer() -> DITrainer:
    cfg = DIConfig(batch_size=16, lr_generator=1e-3, lr_ta=1e-3, alpha=0.1, seed=7)
    models = build_models(GaussianMixture(default_means(4), 0.05), hidden=16, seed=0)
    return DITrainer(cfg, models, class_prompts(4), reward=TargetReward(torch.tensor([1.0, 1.0])))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run directory holding step-000001 and step-000002 (`latest`), and the trainer's state at step 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("pristine")
    trainer = make_trainer()
    trainer.train_step(0)
    ckpt.save_checkpoint(trainer, run, 1, total_steps=4)
    at_step_1 = full_state(trainer)
    trainer.train_step(1)
    ckpt.save_checkpoint(trainer, run, 2, total_steps=4)
    torch.set_num_threads(before)
    return run, at_step_1


@pytest.fixture
def run_dir(pristine: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    shutil.copytree(pristine[0], tmp_path / "run")
    return tmp_path / "run"


def edit_meta(ckpt_dir: Path, change: Callable[[Meta], None]) -> None:
    path = ckpt_dir / ckpt.META
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def setter(dotted: str, value: Any) -> Callable[[Meta], None]:
    """Sets (or, with DELETE, removes) meta[a][b]...; list indices are written as numbers."""

    def change(meta: Meta) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in dotted.split("/")]
        obj: Any = meta
        for key in parents:
            obj = obj[key]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value

    return change


DELETE = object()
OPT = "optimizers/generator/param_groups/0"
GEN = "generator.safetensors"

# name -> (change to step-000002's meta.json, the reason the message must give)
META_DAMAGE: dict[str, tuple[Callable[[Meta], None], str]] = {
    # the cases of the issue
    "step abc": (setter("step", "abc"), "step must be an integer >= 0, got 'abc'"),
    "no optimizers": (setter("optimizers", DELETE), "optimizers is missing"),
    "string lr": (setter(f"{OPT}/lr", "1e-3"), r"optimizers.generator.param_groups\[0\].lr must be a finite "
                                               r"number >= 0, got '1e-3'"),
    "negative step": (setter("step", -5), "step must be an integer >= 0, got -5"),
    "step of another folder": (setter("step", 1), r"step is 1, but the folder is step-000002 \(step 2\)"),
    # the other fields
    "step true": (setter("step", True), "step must be an integer >= 0, got True"),
    "step float": (setter("step", 2.0), "step must be an integer >= 0, got 2.0"),
    "steps string": (setter("steps", "4"), "steps must be an integer >= 1, got '4'"),
    "format": (setter("format", "other"), "format must be 'diffinstruct-checkpoint', got 'other'"),
    "format_version": (setter("format_version", 2), "format_version is 2; this version of diffinstruct reads 1"),
    "method": (setter("method", "gan"), "method must be one of di, dipp, distar, got 'gan'"),
    "alpha string": (setter("alpha", "0.1"), "alpha must be a finite number >= 0, got '0.1'"),
    "alpha differs from config": (setter("alpha", 0.5), "alpha is 0.5 but config.alpha is 0.1"),
    "omega negative": (setter("omega", -1.0), "omega must be a finite number >= 0, got -1.0"),
    "seed null": (setter("seed", None), "seed must be an integer >= 0, got None"),
    "base_model number": (setter("base_model", 3), "base_model must be a string, got 3"),
    "created number": (setter("created", 3), "created must be a string, got 3"),
    "metadata list": (setter("metadata", []), r"metadata must be a JSON object, got \[\]"),
    "config string": (setter("config", "x"), "config must be a JSON object, got 'x'"),
    "versions number": (setter("versions/torch", 2), "versions.torch must be a string, got 2"),
    "counter string": (setter("counters/bad_in_a_row", "1"), "counters.bad_in_a_row must be an integer >= 0, got '1'"),
    "counter negative": (setter("counters/skipped_steps", -1), "counters.skipped_steps must be an integer >= 0"),
    "two param groups": (lambda m: m["optimizers"]["ta"]["param_groups"].append({}),
                         "optimizers.ta.param_groups must hold exactly one group, got 2"),
    "betas one": (setter(f"{OPT}/betas", [0.9]), r"betas must be a list of two numbers in \[0, 1\), got \[0.9\]"),
    "betas range": (setter(f"{OPT}/betas", [0.0, 1.5]), r"betas must be a list of two numbers in \[0, 1\)"),
    "eps zero": (setter(f"{OPT}/eps", 0), r"param_groups\[0\].eps must be a finite number > 0, got 0"),
    "weight_decay null": (setter(f"{OPT}/weight_decay", None), "weight_decay must be a finite number >= 0, got None"),
    "decoupled string": (setter(f"{OPT}/decoupled", "no"), "decoupled must be true or false, got 'no'"),
    "group params": (setter(f"{OPT}/params", [0, 1]), "params must not be stored"),
    "group other key": (setter(f"{OPT}/foo", {"a": 1}), r"param_groups\[0\].foo must be a number"),
    "state scalar key": (setter("optimizers/ta/state_scalars", {"x": 1}), "state_scalars has key 'x'"),
    "state scalar index": (setter("optimizers/ta/state_scalars", {"99.step": 1}), "index below 9"),
    "state scalar value": (setter("optimizers/ta/state_scalars", {"0.step": "1"}),
                           "state_scalars.0.step must be a finite number or true/false, got '1'"),
    "params not list": (setter("params/generator", {}), r"params.generator must be a list, got \{\}"),
    "param shape": (setter("params/ta/0/shape", [-1]), r"params.ta\[0\].shape must be a list of integers >= 0"),
    "param name": (setter("params/ta/0/name", None), r"params.ta\[0\].name must be a string, got None"),
    "file not listed": (setter(f"files/{GEN}", DELETE), "files does not list generator.safetensors"),
    "file not ours": (lambda m: m["files"].update({"../elsewhere": {"bytes": 0, "sha256": "0" * 64}}),
                      "files lists '../elsewhere'; a checkpoint holds only"),
    "file bytes string": (setter(f"files/{GEN}/bytes", "3528"),
                          r"files\['generator.safetensors'\].bytes must be an integer >= 0, got '3528'"),
    "file sha256": (setter(f"files/{GEN}/sha256", "xyz"), "sha256 must be 64 lower-case hex digits, got 'xyz'"),
    "file entry": (setter(f"files/{GEN}", 5), r"files\['generator.safetensors'\] must be a JSON object, got 5"),
}
# every key save_checkpoint writes is required
for _key in ("step", "steps", "method", "alpha", "omega", "seed", "base_model", "config", "counters", "params",
             "versions", "created", "metadata", "files"):
    META_DAMAGE[f"no {_key}"] = (setter(_key, DELETE), f"{_key} is missing")
for _dotted, _name in (("counters/skipped_steps", "counters.skipped_steps"), ("params/ta", "params.ta"),
                       ("optimizers/ta", "optimizers.ta"), ("optimizers/ta/param_groups", "optimizers.ta.param_groups"),
                       ("optimizers/ta/state_scalars", "optimizers.ta.state_scalars"),
                       (f"{OPT}/lr", r"param_groups\[0\].lr"), (f"{OPT}/betas", r"param_groups\[0\].betas"),
                       ("params/generator/0/shape", r"params.generator\[0\].shape"),
                       (f"files/{GEN}/sha256", r"files\['generator.safetensors'\].sha256")):
    META_DAMAGE[f"no {_name}"] = (setter(_dotted, DELETE), f"{_name} is missing" if "sha256" not in _dotted
                                  else "sha256 must be 64 lower-case hex digits, got None")


def assert_resumes_step_1(run: Path, at_step_1: dict[str, torch.Tensor], reason: str) -> None:
    """`latest` (step 2) is damaged: resuming warns naming its file and reason, and restores step 1 exactly."""
    with pytest.warns(CheckpointDamagedWarning, match=r"skipping damaged checkpoint step-000002: .*" + reason):
        assert ckpt.latest_checkpoint(run, verify=True) == run / "step-000001"
    trainer = make_trainer()
    with pytest.warns(CheckpointDamagedWarning, match=reason):
        info = ckpt.load_checkpoint(trainer, run)
    assert info.step == 1 and info.path == run / "step-000001"
    state = full_state(trainer)
    assert state.keys() == at_step_1.keys()
    assert all(torch.equal(state[k], at_step_1[k]) for k in state), "not bitwise the state after step 1"


@pytest.mark.parametrize("case", sorted(META_DAMAGE))
def test_damaged_meta_is_named_and_skipped(run_dir, pristine, case):
    change, reason = META_DAMAGE[case]
    damaged = run_dir / "step-000002"
    edit_meta(damaged, change)
    with pytest.raises(CheckpointDamaged) as caught:
        ckpt.check_checkpoint(damaged)
    assert caught.value.file == damaged / "meta.json"
    assert re.search(reason, caught.value.reason), (reason, caught.value.reason)
    assert str(caught.value).startswith(f"{damaged / 'meta.json'}: ")
    with pytest.raises(CheckpointDamaged, match=reason):  # asked for by name: refused, no traceback of ours
        ckpt.load_checkpoint(make_trainer(), damaged)
    assert_resumes_step_1(run_dir, pristine[1], reason)


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "not readable as JSON"),
    ("", "not readable as JSON"),
    (b"\xff\xfe{}", "not readable as JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('"text"', "must hold a JSON object, got str"),
    ("null", "must hold a JSON object, got NoneType"),
])
def test_meta_that_is_not_a_json_object(run_dir, pristine, content, reason):
    meta = run_dir / "step-000002" / "meta.json"
    if isinstance(content, bytes):
        meta.write_bytes(content)
    else:
        meta.write_text(content)
    with pytest.raises(CheckpointDamaged, match=reason) as caught:
        ckpt.check_checkpoint(meta.parent)
    assert caught.value.file == meta
    assert_resumes_step_1(run_dir, pristine[1], reason)


def test_same_size_corruption_falls_back_to_the_older_checkpoint(run_dir, pristine):
    f = run_dir / "step-000002" / GEN
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert ckpt.incomplete_reason(f.parent) is None  # the size is right: only the hash tells
    assert_resumes_step_1(run_dir, pristine[1], "generator.safetensors: corrupt: its SHA-256 differs")


def test_truncation_falls_back_to_the_older_checkpoint(run_dir, pristine):
    f = run_dir / "step-000002" / "optimizer.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-100])
    assert_resumes_step_1(run_dir, pristine[1], f"optimizer.safetensors: has {size - 100} bytes, meta.json records "
                                                f"{size}")


@pytest.mark.parametrize("victim", ["meta.json", "ta.safetensors"])
def test_missing_file_falls_back(run_dir, pristine, victim):
    (run_dir / "step-000002" / victim).unlink()
    assert_resumes_step_1(run_dir, pristine[1], rf"{victim}: missing \(the checkpoint is incomplete\)")


def test_latest_pointer_that_is_not_text_is_ignored(run_dir):
    (run_dir / "latest").write_bytes(b"\xff\xfe\x00")
    assert ckpt.latest_checkpoint(run_dir, verify=True) == run_dir / "step-000002"


def test_every_checkpoint_damaged_raises_no_usable_checkpoint(run_dir):
    edit_meta(run_dir / "step-000002", setter("step", "abc"))
    (run_dir / "step-000001" / GEN).write_bytes(b"cut")
    with pytest.warns(CheckpointDamagedWarning) as shown, pytest.raises(NoUsableCheckpoint) as caught:
        ckpt.latest_checkpoint(run_dir, verify=True)
    assert [str(w.message).split(":")[0] for w in shown] == [
        "skipping damaged checkpoint step-000002", "skipping damaged checkpoint step-000001"]
    message = str(caught.value)
    assert message.startswith(f"{run_dir} holds no usable checkpoint: all 2 are damaged")
    assert f"{run_dir / 'step-000002' / 'meta.json'}: step must be an integer" in message
    assert f"{run_dir / 'step-000001' / GEN}: has 3 bytes" in message
    trainer = make_trainer()
    before = full_state(trainer)
    with pytest.warns(CheckpointDamagedWarning), pytest.raises(NoUsableCheckpoint):
        runner.run(trainer, runner.RunOptions(4, run_dir, 2, resume=True, curves=False),
                   runner.ConsoleHooks(progress=False))
    assert all(torch.equal(v, before[k]) for k, v in full_state(trainer).items())  # nothing ran
    assert not (run_dir / runner.METRICS_FILE).exists()


def test_unexpected_optimizer_tensor_is_damage_not_a_traceback(run_dir):
    """A tensor file rewritten by hand with meta.json updated to match: still refused by name."""
    target = run_dir / "step-000002"
    f = target / "optimizer.safetensors"
    save_file({**load_file(f), "junk": torch.zeros(1)}, f)
    edit_meta(target, setter("files/optimizer.safetensors", {"bytes": f.stat().st_size,
                                                             "sha256": ckpt.sha256_file(f)}))
    with pytest.raises(CheckpointDamaged, match="optimizer.safetensors: holds an unexpected tensor 'junk'"):
        ckpt.load_checkpoint(make_trainer(), target)
    f.write_bytes(b"\0" * f.stat().st_size)
    edit_meta(target, setter("files/optimizer.safetensors/sha256", ckpt.sha256_file(f)))
    with pytest.raises(CheckpointDamaged, match="optimizer.safetensors: not readable as safetensors"):
        ckpt.load_checkpoint(make_trainer(), target)


def test_damaged_exception_pickles():
    import pickle

    exc = pickle.loads(pickle.dumps(CheckpointDamaged(Path("/r/step-000001/meta.json"), "step is missing")))
    assert (exc.file, exc.reason, str(exc)) == (Path("/r/step-000001/meta.json"), "step is missing",
                                                "/r/step-000001/meta.json: step is missing")


# ============================================================================================== loop and ComfyUI
def test_without_resume_a_damaged_run_is_not_taken_for_an_empty_folder(run_dir):
    for step in ("step-000001", "step-000002"):
        (run_dir / step / GEN).unlink()
    assert ckpt.list_checkpoints(run_dir) == []
    with pytest.raises(ConfigError, match="already holds a run .newest checkpoint step-000002"):
        runner.run(make_trainer(), runner.RunOptions(4, run_dir, 2, resume=False, curves=False),
                   runner.ConsoleHooks(progress=False))
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_comfy_resume_skips_damaged_and_stops_when_none_is_usable(run_dir, pristine):
    edit_meta(run_dir / "step-000002", setter("step", -5))
    trainer = make_trainer()
    hooks = comfy_train.ComfyHooks()
    resume, fresh = (runner.RunOptions(4, run_dir, 2, resume=flag) for flag in (True, False))
    with pytest.warns(CheckpointDamagedWarning, match="step must be an integer >= 0, got -5"):
        assert runner.start_point(trainer, resume, hooks) == (1, run_dir / "step-000001")
    assert all(torch.equal(v, pristine[1][k]) for k, v in full_state(trainer).items())
    (run_dir / "step-000001" / GEN).unlink()
    with pytest.warns(CheckpointDamagedWarning), pytest.raises(NoUsableCheckpoint, match="no usable checkpoint"):
        runner.start_point(make_trainer(), resume, hooks)
    with pytest.raises(ConfigError, match="checkpoint folder .* already holds a run .newest step-000002.; enable"):
        runner.start_point(make_trainer(), fresh, hooks)


# ============================================================================================== the command line
CONFIG = """
[run]
problem = "toy2d"
steps = 20
out_dir = "{out}"
checkpoint_every = 10
keep = 0
seed = 1

[train]
batch_size = 32
lr_generator = 1e-3
lr_ta = 1e-3
alpha = 0.1

[toy2d]
classes = 3
hidden = 16

[reward]
name = "target"
target = [1.0, 1.0]
"""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-step toy run with checkpoints at 10 and 20, trained once through cli.main."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    (root / "run.toml").write_text(CONFIG.format(out=root / "out"))
    assert cli.main(["train", "--config", str(root / "run.toml"), "--no-progress"]) == 0
    torch.set_num_threads(before)
    return root


def resume(config: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diffinstruct", "train", "--config", str(config), "--resume",
                           "--no-progress", *more], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def copy_run(cli_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(cli_run / "out", tmp_path / "out")
    (tmp_path / "run.toml").write_text(CONFIG.format(out=tmp_path / "out"))
    return tmp_path / "run.toml"


def test_cli_resume_with_every_checkpoint_truncated_exits_2(cli_run, tmp_path, capsys):
    config = copy_run(cli_run, tmp_path)
    out = tmp_path / "out"
    for step in ("step-000010", "step-000020"):
        f = out / step / GEN
        f.write_bytes(f.read_bytes()[:-8])
    metrics = (out / "metrics.jsonl").read_bytes()
    proc = resume(config)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "error"], proc.stderr
    assert lines[0].startswith(f"warning: skipping damaged checkpoint step-000020: {out / 'step-000020' / GEN}: has ")
    assert lines[1].startswith(f"warning: skipping damaged checkpoint step-000010: {out / 'step-000010' / GEN}: has ")
    assert lines[2].startswith(f"error: {out} holds no usable checkpoint: all 2 are damaged")
    assert "Nothing was resumed" in lines[2]
    assert (out / "metrics.jsonl").read_bytes() == metrics  # no restart from step 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000010", "step-000020"]
    # without --resume the damaged run is not overwritten either
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 2
    assert "already holds a run (newest checkpoint step-000020)" in capsys.readouterr().err


def test_cli_resume_falls_back_and_continues_bitwise(cli_run, tmp_path):
    """The newest checkpoint is cut short: --resume warns, continues from step 10, and ends where the
    undamaged run ended, bit for bit."""
    config = copy_run(cli_run, tmp_path)
    out = tmp_path / "out"
    f = out / "step-000020" / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    proc = resume(config)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"warning: skipping damaged checkpoint step-000020: {f}: has ")
    assert proc.stderr.count("warning:") == 1 and "UserWarning" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["start_step"] == 10 and summary["resumed_from"].endswith("step-000010")
    assert summary["completed"] == 20
    for name in ckpt.TENSOR_FILES.values():
        new, old = load_file(out / "step-000020" / name), load_file(cli_run / "out" / "step-000020" / name)
        assert new.keys() == old.keys() and new, name
        assert all(torch.equal(new[k], old[k]) for k in new), name
    assert ckpt.incomplete_reason(out / "step-000020", verify=True) is None  # rewritten whole
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(
        read_jsonl(cli_run / "out" / "metrics.jsonl"))


def test_cli_resume_skips_meta_with_step_abc(cli_run, tmp_path):
    config = copy_run(cli_run, tmp_path)
    edit_meta(tmp_path / "out" / "step-000020", setter("step", "abc"))
    proc = resume(config, "--steps", "10")  # already there: nothing to train, only the choice is shown
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: skipping damaged checkpoint step-000020: "
                                  f"{tmp_path / 'out' / 'step-000020' / 'meta.json'}: step must be an integer >= 0, "
                                  "got 'abc'")
    assert json.loads(proc.stdout)["start_step"] == 10
