"""Checkpoints: exact round trip, atomic layout, pruning, fallback, clear errors, and SIGKILL while saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffinstruct import checkpoint as ckpt
from diffinstruct.config import DIConfig
from diffinstruct.errors import CheckpointError
from diffinstruct.rewards import TargetReward
from diffinstruct.toy import GaussianMixture, build_models, class_prompts, default_means
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(hidden: int = 16, **overrides) -> DITrainer:
    cfg = DIConfig(**{"batch_size": 16, "lr_generator": 1e-3, "lr_ta": 1e-3, "alpha": 0.1, "seed": 7, **overrides})
    models = build_models(GaussianMixture(default_means(4), 0.05), hidden=hidden, seed=0)
    return DITrainer(cfg, models, class_prompts(4), reward=TargetReward(torch.tensor([1.0, 1.0])))


def assert_same(a: DITrainer, b: DITrainer) -> None:
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert (a.bad_in_a_row, a.skipped_steps) == (b.bad_in_a_row, b.skipped_steps)
    for oa, ob in ((a.opt_generator, b.opt_generator), (a.opt_ta, b.opt_ta)):
        ga, gb = oa.param_groups[0], ob.param_groups[0]
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


def test_round_trip_then_continue_is_bitwise_exact(tmp_path):
    a = make_trainer()
    for s in range(3):
        a.train_step(s)
    a.skipped_steps, a.bad_in_a_row = 2, 1  # counters travel too
    path = ckpt.save_checkpoint(a, tmp_path, 3, metadata={"note": "hi"}, base_model="toy", total_steps=5)
    assert path == tmp_path / "step-000003"
    b = make_trainer()
    info = ckpt.load_checkpoint(b, tmp_path)
    assert info.step == 3 and info.path == path
    assert_same(a, b)
    a.skipped_steps = b.skipped_steps = a.bad_in_a_row = b.bad_in_a_row = 0
    for s in range(3, 5):
        a.train_step(s)
        b.train_step(s)
    assert_same(a, b)
    # the trainer really moved away from its initialisation
    assert not torch.equal(a.generator_params[0], make_trainer().generator_params[0])

    meta = info.meta
    assert (meta["method"], meta["alpha"], meta["omega"], meta["seed"], meta["steps"]) == ("dipp", 0.1, 1.0, 7, 5)
    assert meta["base_model"] == "toy" and meta["metadata"] == {"note": "hi"}
    assert meta["counters"] == {"bad_in_a_row": 1, "skipped_steps": 2}
    assert DIConfig.from_dict(meta["config"]) == a.cfg
    assert {"diffinstruct", "torch", "numpy", "safetensors", "python"} <= set(meta["versions"])
    assert meta["params"]["generator"][0]["name"].startswith("denoiser.")


def test_layout_latest_pointer_and_pruning(tmp_path):
    t = make_trainer()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(t, tmp_path, step, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-000003", "step-000004"]  # no temporary or trash entries left
    assert (tmp_path / "latest").read_text() == "step-000004\n"
    assert sorted(p.name for p in (tmp_path / "step-000004").iterdir()) == [
        "ema.safetensors", "generator.safetensors", "meta.json", "optimizer.safetensors", "ta.safetensors"]
    ckpt.save_checkpoint(t, tmp_path, 5, keep=0)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5]
    # saving the same step again replaces it in place
    ckpt.save_checkpoint(t, tmp_path, 5, keep=0)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5]


def test_latest_fallbacks(tmp_path):
    t = make_trainer()
    for step in (1, 2):
        ckpt.save_checkpoint(t, tmp_path, step)
    (tmp_path / "latest").unlink()
    assert ckpt.find_checkpoint(tmp_path).name == "step-000002"
    (tmp_path / "latest").write_text("step-000009\n")  # names something that is not there
    with pytest.warns(UserWarning, match="step-000009"):
        assert ckpt.find_checkpoint(tmp_path).name == "step-000002"
    (tmp_path / "latest").write_text("step-000002\n")
    (tmp_path / "step-000002" / "ta.safetensors").unlink()  # latest is incomplete
    with pytest.warns(UserWarning, match="ta.safetensors: missing"):
        assert ckpt.find_checkpoint(tmp_path).name == "step-000001"
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("victim", ["meta.json", "ema.safetensors", "optimizer.safetensors"])
def test_missing_file_is_named(tmp_path, victim):
    t = make_trainer()
    path = ckpt.save_checkpoint(t, tmp_path, 1)
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.") + ": missing"):
        ckpt.load_checkpoint(make_trainer(), path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"), pytest.warns(UserWarning):
        ckpt.find_checkpoint(tmp_path)


def test_other_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.find_checkpoint(tmp_path)
    t = make_trainer()
    path = ckpt.save_checkpoint(t, tmp_path, 1)
    # same size, different bytes: caught by the hash
    f = path / "generator.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="generator.safetensors: corrupt"):
        ckpt.load_checkpoint(make_trainer(), path)
    # truncated file: caught by the size recorded in meta.json
    f.write_bytes(bytes(data[:-4]))
    with pytest.raises(CheckpointError, match="generator.safetensors: has"):
        ckpt.load_checkpoint(make_trainer(), path)


def test_shape_mismatch_is_refused_before_anything_changes(tmp_path):
    ckpt.save_checkpoint(make_trainer(hidden=16), tmp_path, 1)
    other = make_trainer(hidden=8)
    params_before = [p.detach().clone() for p in other.generator_params]
    with pytest.raises(CheckpointError, match=r"parameter 0 \(denoiser.net.embed.weight\) has shape \[5, 16\] "
                                              r"in the checkpoint but \[5, 8\]"):
        ckpt.load_checkpoint(other, tmp_path)
    assert not other.opt_generator.state and not other.opt_ta.state
    assert all(torch.equal(p, q) for p, q in zip(other.generator_params, params_before, strict=True))


def test_config_difference_warns(tmp_path):
    ckpt.save_checkpoint(make_trainer(), tmp_path, 1)
    with pytest.warns(UserWarning, match="lr_ta"):
        ckpt.load_checkpoint(make_trainer(lr_ta=2e-3), tmp_path)


def test_exception_during_save_leaves_no_trace(tmp_path, monkeypatch):
    t = make_trainer()
    ckpt.save_checkpoint(t, tmp_path, 1)

    def boom(stage, path):
        if stage == "file" and path.name == "ta.safetensors":
            raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_save_hook", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(t, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from diffinstruct import checkpoint as ckpt
    from diffinstruct.config import DIConfig
    from diffinstruct.toy import GaussianMixture, build_models, class_prompts, default_means
    from diffinstruct.trainer import DITrainer

    torch.set_num_threads(1)
    models = build_models(GaussianMixture(default_means(4), 0.05), hidden=16, seed=0)
    t = DITrainer(DIConfig(batch_size=16, lr_generator=1e-3, lr_ta=1e-3), models, class_prompts(4))
    t.train_step(0)
    ckpt.save_checkpoint(t, sys.argv[1], 1)
    t.train_step(1)

    def hook(stage, path):  # pause between two files of the second checkpoint
        if stage == "file" and path.name == "ema.safetensors":
            print("PAUSED", path, flush=True)
            time.sleep(60)

    ckpt._save_hook = hook
    ckpt.save_checkpoint(t, sys.argv[1], 2)
    print("NOT KILLED", flush=True)
""")


def check_recovers(run_dir: Path) -> None:
    """step 1 is what loads; the next save removes what a dead writer left behind."""
    assert (run_dir / "latest").read_text() == "step-000001\n"
    assert ckpt.find_checkpoint(run_dir).name == "step-000001"
    t = make_trainer(alpha=0.0, seed=0)
    assert ckpt.load_checkpoint(t, run_dir).step == 1
    ckpt.save_checkpoint(t, run_dir, 3)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert ckpt.find_checkpoint(run_dir).name == "step-000003"


def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PAUSED"), line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000002-")
    assert sorted((tmp_path / leftovers[0]).iterdir())  # it did hold files
    assert not (tmp_path / "step-000002").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]  # the half-written one is never picked up
    check_recovers(tmp_path)


class Killed(BaseException):
    pass


def test_death_between_rename_and_pointer(tmp_path, monkeypatch):
    """Dying after the rename but before `latest` is replaced: latest still names step 1, which loads."""
    t = make_trainer(alpha=0.0, seed=0)
    ckpt.save_checkpoint(t, tmp_path, 1)

    def hook(stage, path):
        if stage == "renamed":
            raise Killed

    monkeypatch.setattr(ckpt, "_save_hook", hook)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(t, tmp_path, 2)
    monkeypatch.setattr(ckpt, "_save_hook", None)
    assert ckpt.incomplete_reason(tmp_path / "step-000002") is None
    check_recovers(tmp_path)


def test_meta_json_is_plain_json(tmp_path):
    t = make_trainer(sigma_min=None)
    t.cfg.extra = {"note": float("nan"), "path": Path("/x")}
    path = ckpt.save_checkpoint(t, tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["extra"] == {"note": None, "path": "/x"}
    assert time.strptime(meta["created"][:19], "%Y-%m-%dT%H:%M:%S")
