"""The training loop: interrupted-and-resumed runs end bitwise identical to uninterrupted ones (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from diffinstruct import checkpoint as ckpt
from diffinstruct import cli, runner
from diffinstruct.config import DIConfig
from diffinstruct.errors import ConfigError
from diffinstruct.metrics import read_jsonl, truncate_from, without_timing
from diffinstruct.rewards import TargetReward
from diffinstruct.runner import RunOptions
from diffinstruct.toy import GaussianMixture, build_models, class_prompts, default_means
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state

STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(method: str = "dipp") -> DITrainer:
    cfg = DIConfig(method=method, batch_size=64, lr_generator=1e-3, lr_ta=1e-3, alpha=0.1, seed=5)
    models = build_models(GaussianMixture(default_means(4), 0.05), hidden=32, seed=0)
    return DITrainer(cfg, models, class_prompts(4), reward=TargetReward(torch.tensor([1.0, 1.0])))


def quiet() -> runner.ConsoleHooks:
    return runner.ConsoleHooks(progress=False)


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def eval_fn(trainer: DITrainer, completed: int) -> dict[str, float]:
    with runner.ema_weights(trainer):  # must leave the training weights untouched
        return {"ema_sum": float(sum(p.detach().double().sum() for p in trainer.generator_params))}


@pytest.fixture(scope="module", params=["dipp", "distar"])
def uninterrupted(request, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(f"full-{request.param}")
    trainer = make_trainer(request.param)
    summary = runner.run(trainer, RunOptions(STEPS, out, 10, resume=False, eval_fn=eval_fn, eval_every=10,
                                             curves=False), quiet())
    assert summary["completed"] == STEPS and summary["start_step"] == 0
    return request.param, out, full_state(trainer)


def test_half_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    method, full_dir, reference = uninterrupted
    first = make_trainer(method)
    runner.run(first, RunOptions(STEPS // 2, tmp_path, 10, resume=False, eval_fn=eval_fn, eval_every=10,
                                 curves=False), quiet())
    second = make_trainer(method)
    summary = runner.run(second, RunOptions(STEPS, tmp_path, 10, resume=True, eval_fn=eval_fn, eval_every=10),
                         quiet())
    assert summary["start_step"] == STEPS // 2 and summary["resumed_from"].endswith("step-000020")
    assert_bitwise(full_state(second), reference)
    assert not torch.equal(reference["g0"], full_state(make_trainer(method))["g0"])  # it trained
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert without_timing(read_jsonl(tmp_path / name)) == without_timing(read_jsonl(full_dir / name)), name
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(STEPS))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_ctrl_c_checkpoints_the_last_whole_step(uninterrupted, tmp_path, monkeypatch):
    method, full_dir, reference = uninterrupted
    trainer = make_trainer(method)
    original = trainer.train_step

    def step_with_ctrl_c(step):
        if step == 13:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; honoured once step 13 has completed
        return original(step)

    monkeypatch.setattr(trainer, "train_step", step_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        runner.run(trainer, RunOptions(STEPS, tmp_path, 10, resume=False, curves=False), quiet())
    assert ckpt.find_checkpoint(tmp_path).name == "step-000014"
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 14
    resumed = make_trainer(method)
    runner.run(resumed, RunOptions(STEPS, tmp_path, 10, resume=True, curves=False), quiet())
    assert_bitwise(full_state(resumed), reference)
    assert without_timing(read_jsonl(tmp_path / "metrics.jsonl")) == without_timing(
        read_jsonl(full_dir / "metrics.jsonl"))


def test_run_directory_rules(tmp_path):
    trainer = make_trainer()
    runner.run(trainer, RunOptions(4, tmp_path, 2, resume=False, curves=False), quiet())
    with pytest.raises(ConfigError, match="already holds a run"):
        runner.run(make_trainer(), RunOptions(4, tmp_path, 2, resume=False), quiet())
    with pytest.raises(ConfigError, match="beyond steps = 3"):
        runner.run(make_trainer(), RunOptions(3, tmp_path, 2, resume=True), quiet())
    done = runner.run(make_trainer(), RunOptions(4, tmp_path, 2, resume=True, curves=False), quiet())
    assert done["start_step"] == done["completed"] == 4 and done["seconds_per_step"] is None
    fresh = runner.run(make_trainer(), RunOptions(2, tmp_path / "new", 5, resume=True, curves=False),
                       quiet())  # --resume with nothing to resume starts at 0
    assert fresh["resumed_from"] is None and fresh["checkpoint"].endswith("step-000002")
    for bad, match in (({"steps": 0}, "steps"), ({"checkpoint_every": 0}, "checkpoint_every"),
                       ({"keep": -1}, "keep"), ({"eval_every": 3}, "eval_fn")):
        kwargs = {"steps": 4, "checkpoint_every": 2, **bad}
        with pytest.raises(ConfigError, match=match):
            runner.run(make_trainer(), RunOptions(out_dir=tmp_path / "x", resume=False, **kwargs), quiet())


class Recording(runner.RunHooks):
    """Hooks that note every call; stop_before: raise Stop before that step (as ComfyUI's Cancel does)."""

    class Stop(Exception):
        pass

    def __init__(self, stop_before: int | None = None, checkpoint: bool = False) -> None:
        self.calls: list[tuple] = []
        self.stop_before, self.checkpoint = stop_before, checkpoint

    def started(self, start, steps):
        self.calls.append(("started", start, steps))

    def before_step(self, step):
        if step == self.stop_before:
            raise self.Stop

    def after_step(self, completed, record):
        self.calls.append(("step", completed, int(record["step"])))

    def on_eval(self, completed, metrics):
        self.calls.append(("eval", completed))

    def on_checkpoint(self, path, completed):
        self.calls.append(("checkpoint", completed, path.name))

    def checkpoint_on(self, exc):
        return self.checkpoint

    def interrupted(self, exc, completed, in_step, written, resume_from):
        self.calls.append(("interrupted", type(exc).__name__, completed, in_step, written and written.name,
                           resume_from and os.path.basename(resume_from)))

    def close(self):
        self.calls.append(("close",))


def test_hooks_see_every_step_evaluation_and_checkpoint(tmp_path):
    hooks = Recording()
    runner.run(make_trainer(), RunOptions(4, tmp_path, 2, eval_fn=eval_fn, eval_every=3, curves=False), hooks)
    assert hooks.calls == [("started", 0, 4), ("step", 1, 0), ("checkpoint", 2, "step-000002"), ("step", 2, 1),
                           ("eval", 3), ("step", 3, 2), ("eval", 4), ("checkpoint", 4, "step-000004"),
                           ("step", 4, 3), ("close",)]
    resumed = Recording()
    runner.run(make_trainer(), RunOptions(5, tmp_path, 2, resume=True, curves=False), resumed)
    assert resumed.calls == [("started", 4, 5), ("checkpoint", 5, "step-000005"), ("step", 5, 4), ("close",)]


def test_an_exception_between_steps_checkpoints_only_when_the_hooks_say_so(tmp_path):
    cancelled = Recording(stop_before=3, checkpoint=True)
    with pytest.raises(Recording.Stop):
        runner.run(make_trainer(), RunOptions(5, tmp_path / "a", 5, curves=False), cancelled)
    assert ckpt.find_checkpoint(tmp_path / "a").name == "step-000003"
    assert cancelled.calls[-2:] == [("interrupted", "Stop", 3, False, "step-000003", "step-000003"), ("close",)]
    plain = Recording(stop_before=3)  # RunHooks' rule: only KeyboardInterrupt checkpoints
    with pytest.raises(Recording.Stop):
        runner.run(make_trainer(), RunOptions(5, tmp_path / "b", 5, curves=False), plain)
    assert ckpt.checkpoint_dirs(tmp_path / "b") == []
    assert plain.calls[-2] == ("interrupted", "Stop", 3, False, None, None)
    first = Recording(stop_before=0, checkpoint=True)  # nothing completed: nothing to checkpoint
    with pytest.raises(Recording.Stop):
        runner.run(make_trainer(), RunOptions(5, tmp_path / "c", 5, curves=False), first)
    assert ckpt.checkpoint_dirs(tmp_path / "c") == []


def test_an_exception_inside_a_step_never_checkpoints(tmp_path, monkeypatch):
    trainer = make_trainer()
    original = trainer.train_step

    def failing(step):
        if step == 2:
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(trainer, "train_step", failing)
    hooks = Recording(checkpoint=True)
    with pytest.raises(KeyboardInterrupt):
        runner.run(trainer, RunOptions(5, tmp_path, 5, curves=False), hooks)
    assert ckpt.checkpoint_dirs(tmp_path) == []
    assert hooks.calls[-2] == ("interrupted", "KeyboardInterrupt", 2, True, None, None)


def test_a_run_without_a_folder_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hooks = Recording()
    trainer = make_trainer()
    summary = runner.run(trainer, RunOptions(3, None, 1, eval_fn=eval_fn, eval_every=3, curves=True), hooks)
    assert list(tmp_path.iterdir()) == []
    assert summary["out_dir"] is None and summary["checkpoint"] is None and summary["metrics"] is None
    assert summary["completed"] == 3 and summary["eval"] is not None
    assert [c[0] for c in hooks.calls] == ["started", "step", "step", "eval", "step", "close"]
    by_hand = make_trainer()
    for step in range(3):
        by_hand.train_step(step)
    assert_bitwise(full_state(trainer), full_state(by_hand))


def test_metrics_truncation_drops_later_and_partial_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"')
    assert len(read_jsonl(path)) == 6  # the cut line is skipped
    assert truncate_from(path, 4) == 4
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]
    assert path.read_text().endswith("\n")


CONFIG = """
[run]
problem = "toy2d"
steps = {steps}
out_dir = "{out}"
checkpoint_every = 10
keep = 2
seed = 0

[train]
batch_size = 64
lr_generator = 1e-3
lr_ta = 1e-3
alpha = 0.1
seed = 5

[toy2d]
hidden = 32

[reward]
name = "target"
target = [1.0, 1.0]
"""

# Runs the CLI but SIGKILLs itself at the start of step 25, after the checkpoint of step 20 and 5 metric lines.
KILL_AT_25 = textwrap.dedent("""
    import os, signal, sys
    from diffinstruct import cli, trainer
    original = trainer.DITrainer.train_step
    def train_step(self, step):
        if step == 25:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step)
    trainer.DITrainer.train_step = train_step
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_sigkill_mid_run_then_cli_resume(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_cfg = tmp_path / "killed.toml"
    killed_cfg.write_text(CONFIG.format(steps=STEPS, out=tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", KILL_AT_25, "train", "--config", str(killed_cfg), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ckpt.find_checkpoint(tmp_path / "killed").name == "step-000020"
    assert len(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == 25

    # resume through the CLI in this process: nothing but the files on disk carries over from the killed one
    assert cli.main(["train", "--config", str(killed_cfg), "--resume", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["start_step"] == 20 and summary["completed"] == STEPS

    # the uninterrupted reference, through the same CLI (also on one thread)
    full_cfg = tmp_path / "full.toml"
    full_cfg.write_text(CONFIG.format(steps=STEPS, out=tmp_path / "full"))
    assert cli.main(["train", "--config", str(full_cfg), "--no-progress"]) == 0
    capsys.readouterr()

    a, b = tmp_path / "killed" / "step-000040", tmp_path / "full" / "step-000040"
    for name in ckpt.TENSOR_FILES.values():
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and ta, name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    ma, mb = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert ma["counters"] == mb["counters"] and ma["optimizers"] == mb["optimizers"]
    assert without_timing(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed")] == [30, 40]  # keep = 2
