"""Data-parallel training under torchrun: 2 CPU processes (gloo) on the toy problem.

* every rank ends with bitwise identical generator, TA, EMA and optimiser states (full DDP models, DI++ with
  grad_accum = 2 and DI*; the shared-base LoRA mode, whose gradients are averaged by hand);
* the effective batch is the sum of the local ones: the gradients of step 0 under DDP equal the mean of the
  gradients one process computes for rank 0's and rank 1's batches (their random streams, via the rank argument);
* only rank 0 writes checkpoints and metrics; the CLI trains and resumes under torchrun;
* a finished run exits 0: when distributed.cleanup returns, no gloo thread is left (one alive at interpreter exit
  could abort the process; see distributed.py), and torchrun's stderr has no "terminate called".

This file is also the worker: torchrun runs it as a script (`python tests/test_distributed.py OUT_DIR`, or
`python tests/test_distributed.py --cli REPORT_DIR train ...` for the CLI with its teardown observed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from diffinstruct import assembly, distributed, runner
from diffinstruct import checkpoint as ckpt
from diffinstruct.config import DIConfig
from diffinstruct.denoisers import EDMDenoiser
from diffinstruct.metrics import read_jsonl
from diffinstruct.rewards import TargetReward
from diffinstruct.toy import GaussianMixture, MLPNet, build_models, class_prompts, default_means
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state

STEPS = 10
WORLD = 2
CASES: dict[str, dict[str, Any]] = {
    "dipp": {"method": "dipp", "grad_accum": 2, "mode": "full", "reward": True},
    "distar": {"method": "distar", "grad_accum": 1, "mode": "full", "reward": False},
    "lora": {"method": "dipp", "grad_accum": 1, "mode": "shared", "reward": True},
    # the other pass plan: the TA first, on its own sample, then the generator
    "fresh": {"method": "dipp", "grad_accum": 2, "mode": "full", "reward": True, "ta_sample": "fresh"},
    # one TA forward serves both halves: the TA's DDP wrapper runs inside the generator's micro-batches
    "onepass": {"method": "dipp", "grad_accum": 2, "mode": "full", "reward": True, "ta_sample": "onepass"},
    "onepass-lora": {"method": "dipp", "grad_accum": 1, "mode": "shared", "reward": True, "ta_sample": "onepass"},
}
EXPECTED_MODE = {"full": "ddp", "shared": "manual"}


def make_trainer(name: str, rank: int = 0, world_size: int = 1) -> DITrainer:
    case = CASES[name]
    cfg = DIConfig(method=case["method"], batch_size=16, grad_accum=case["grad_accum"], lr_generator=1e-3,
                   lr_ta=1e-3, alpha=0.1 if case["reward"] else 0.0, seed=3,
                   ta_sample=case.get("ta_sample", "reuse"))
    mixture = GaussianMixture(default_means(4), 0.05)
    if case["mode"] == "full":
        models = build_models(mixture, hidden=16, seed=0)
    else:
        torch.manual_seed(0)
        teacher = EDMDenoiser(MLPNet(2, 4, 16))
        models = assembly.build_models(teacher, (2,), mode="shared", rank=2, sigma_init=2.5)
    reward = TargetReward(torch.tensor([1.0, 1.0])) if case["reward"] else None
    return DITrainer(cfg, models, class_prompts(4), reward=reward, rank=rank, world_size=world_size)


def capture_first_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], into: dict[str, Any],
                       key: str, step: bool = True) -> None:
    """Record the gradients the optimiser sees at its first step (then step, or not)."""
    original = opt.step

    def patched() -> None:
        if key not in into:
            into[key] = [p.grad.detach().clone() for p in params]
        if step:
            original()

    opt.step = patched  # type: ignore[method-assign]


# ============================================================================================== the worker
def gloo_threads() -> list[str] | None:
    """This process's threads that belong to a gloo process group, by name; None where /proc does not tell."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:  # pt_gloo_runloop (the group's workers), gloo_tcp_loop (its transport)
            names.append(name)
    return sorted(names)


def write_teardown_report(report_dir: Path, before: list[str] | None, after: list[str] | None) -> None:
    rank = int(os.environ["RANK"])
    (report_dir / f"teardown-rank{rank}.json").write_text(json.dumps({"before": before, "after": after}))


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    env = distributed.init_from_env()
    assert env.world_size == WORLD and dist_backend() == "gloo"
    saves: list[tuple[str, int]] = []
    original_save = ckpt.save_checkpoint

    def recording_save(trainer: DITrainer, run_dir: Any, step: int, **kwargs: Any) -> Path:
        saves.append((str(run_dir), step))
        return original_save(trainer, run_dir, step, **kwargs)

    ckpt.save_checkpoint = recording_save
    kept: list[distributed.DDPState] = []  # every case's state (DDP wrappers included) is still held at cleanup
    try:
        for name in CASES:
            trainer = make_trainer(name, env.rank, env.world_size)
            state = distributed.wrap_trainer(trainer)
            assert state is not None
            kept.append(state)
            grads: dict[str, Any] = {}
            capture_first_step(trainer.opt_ta, trainer.ta_params, grads, "ta")
            capture_first_step(trainer.opt_generator, trainer.generator_params, grads, "generator")
            saves.clear()
            summary = runner.run(trainer, runner.RunOptions(STEPS, out / name, 5, resume=False, curves=False),
                                 runner.ConsoleHooks(progress=False))
            torch.save({"state": full_state(trainer), "grads": grads, "saves": list(saves),
                        "modes": {r: state.mode(r) for r in distributed.ROLES}, "completed": summary["completed"]},
                       out / f"{name}-rank{env.rank}.pt")
    finally:
        ckpt.save_checkpoint = original_save
        before = gloo_threads()
        distributed.cleanup(env)
    write_teardown_report(out, before, gloo_threads())
    left = [role for st in kept for role in distributed.ROLES if isinstance(getattr(st, role), DistributedDataParallel)]
    assert not left, f"cleanup left DDP wrappers (they hold the process group): {left}"


def cli_worker(report_dir: Path, argv: list[str]) -> int:
    """`python -m diffinstruct ARGV` (cli.main), recording the gloo threads at and after the CLI's cleanup."""
    from diffinstruct import cli

    seen: dict[str, Any] = {}
    original = distributed.cleanup

    def recording_cleanup(env: distributed.DistEnv, *args: Any, **kwargs: Any) -> None:
        seen["before"] = gloo_threads()
        original(env, *args, **kwargs)
        # right here, while the train command still holds the trainer and its DDP wrappers: cleanup must suffice
        seen["after"] = gloo_threads()

    distributed.cleanup = recording_cleanup  # type: ignore[assignment]
    try:
        status = cli.main(argv)
    finally:
        distributed.cleanup = original  # type: ignore[assignment]
    write_teardown_report(report_dir, seen.get("before"), seen.get("after"))
    return status


def check_teardown(report_dir: Path) -> None:
    for rank in range(WORLD):
        report = json.loads((report_dir / f"teardown-rank{rank}.json").read_text())
        if report["before"] is None:
            pytest.skip("no /proc/self/task: cannot list the threads")
        assert report["before"], f"rank {rank}: no gloo thread while the group was up; the check below is void"
        assert report["after"] == [], (f"rank {rank}: {report['after']} still alive after distributed.cleanup; at "
                                       "interpreter exit they can abort the process (SIGABRT, torchrun exits 1)")


def dist_backend() -> str:
    return str(torch.distributed.get_backend())


# ============================================================================================== launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "terminate called" not in proc.stderr, f"{' '.join(cmd)}: a rank aborted\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(Path(__file__).resolve()), str(out)], cwd=out)
    return out, {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(WORLD)] for name in CASES}


pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================== tests
def test_teardown_leaves_no_gloo_thread(ddp_run):
    """cleanup really destroys the group, though the worker still holds every case's DDP state."""
    out, _ = ddp_run
    check_teardown(out)


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_stay_bitwise_identical(ddp_run, name):
    _, results = ddp_run
    r0, r1 = results[name]
    assert r0["completed"] == r1["completed"] == STEPS
    assert r0["modes"] == r1["modes"] == {r: EXPECTED_MODE[CASES[name]["mode"]] for r in distributed.ROLES}
    a, b = r0["state"], r1["state"]
    assert a.keys() == b.keys()
    assert any(k.startswith("og") for k in a) and any(k.startswith("ot") for k in a)  # optimiser states present
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"ranks differ in {different}"
    fresh = full_state_params(make_trainer(name))
    moved = [k for k in fresh if not torch.equal(fresh[k], a[k])]
    assert moved, "training did not change the parameters"


def full_state_params(trainer: DITrainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in full_state(trainer).items() if k[0] in "gte" and "." not in k}


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    den = max(float(w.abs().max()) for w in want)
    return num / den


def _mean(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(ts).mean(0) for ts in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("name", list(CASES))
def test_effective_batch_is_the_sum_of_the_local_batches(ddp_run, name):
    """Step 0's gradients under DDP == the mean of rank 0's and rank 1's local gradients, computed here."""
    _, results = ddp_run
    ddp_grads = results[name][0]["grads"]
    for key in ("ta", "generator"):  # both ranks stepped with the same (all-reduced) gradients
        assert all(torch.equal(g0, g1) for g0, g1 in zip(ddp_grads[key], results[name][1]["grads"][key],
                                                        strict=True))
    refs = [make_trainer(name, rank=r, world_size=WORLD) for r in range(WORLD)]  # no process group: local only
    local = {"reuse": _local_reuse, "fresh": _local_fresh, "onepass": _local_onepass}
    local_gen, local_ta = local[CASES[name].get("ta_sample", "reuse")](refs)
    check_mean(ddp_grads["ta"], local_ta, "TA")
    check_mean(ddp_grads["generator"], local_gen, "generator")


def _local_reuse(refs: list[DITrainer]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The default pass plan: the generator half of step 0, then the TA half on the generator's detached samples;
    each rank's local gradients (neither applied: both halves read the weights of before the step)."""
    local_gen, local_ta = [], []
    for t in refs:
        samples: list[Any] = []
        _, bad = t.accumulate_generator_grads(0, samples)
        assert bad == 0 and len(samples) == t.cfg.grad_accum
        local_gen.append([p.grad.detach().clone() for p in t.generator_params])
        _, bad = t.accumulate_ta_grads(0, 0, samples)
        assert bad == 0
        local_ta.append([p.grad.detach().clone() for p in t.ta_params])
    return local_gen, local_ta


def _local_onepass(refs: list[DITrainer]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """ta_sample = "onepass": the generator half of step 0 fills both roles' gradients (its TA forwards train)."""
    local_gen, local_ta = [], []
    for t in refs:
        results: list[Any] = []
        _, bad = t.accumulate_generator_grads(0, ta_results=results)
        assert bad == 0 and len(results) == t.cfg.grad_accum
        local_gen.append([p.grad.detach().clone() for p in t.generator_params])
        local_ta.append([p.grad.detach().clone() for p in t.ta_params])
    return local_gen, local_ta


def _local_fresh(refs: list[DITrainer]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """ta_sample = "fresh": the TA half of step 0 on its own samples, the mean applied as DDP did on every rank,
    then the generator half."""
    local_ta: list[list[torch.Tensor]] = []
    for t in refs:
        got: dict[str, Any] = {}
        capture_first_step(t.opt_ta, t.ta_params, got, "ta", step=False)
        assert t.ta_step(0)["ta_ok"] == 1.0
        local_ta.append(got["ta"])
    mean_ta = _mean(local_ta)
    local_gen: list[list[torch.Tensor]] = []
    for t in refs:
        for p, g in zip(t.ta_params, mean_ta, strict=True):
            p.grad = g.clone()
        type(t.opt_ta).step(t.opt_ta)
        for p in t.ta_params:
            p.grad = None
        _, bad = t.accumulate_generator_grads(0)
        assert bad == 0
        local_gen.append([p.grad.detach().clone() for p in t.generator_params])
        for p in t.generator_params:
            p.grad = None
    return local_gen, local_ta


def check_mean(ddp: list[torch.Tensor], local: list[list[torch.Tensor]], what: str) -> None:
    mean = _mean(local)
    assert max(float(m.abs().max()) for m in mean) > 0, f"{what}: zero gradient, nothing is tested"
    err = _rel_err(ddp, mean)
    assert err < 1e-5, f"{what}: DDP gradient differs from the mean over both ranks' batches (rel. error {err:.3g})"
    # the check can fail: either rank's local gradient alone (no all-reduce) or the sum (no averaging) is far off
    for r, g in enumerate(local):
        assert _rel_err(g, mean) > 1e-3, f"{what}: rank {r}'s batch alone gives the same gradient; test is void"
    assert _rel_err([2 * m for m in mean], mean) > 0.5


@pytest.mark.parametrize("name", list(CASES))
def test_only_rank_0_writes(ddp_run, name):
    out, results = ddp_run
    r0, r1 = results[name]
    assert [s for _, s in r0["saves"]] == [5, 10] and r1["saves"] == []
    assert [s for s, _ in ckpt.list_checkpoints(out / name)] == [5, 10]
    records = read_jsonl(out / name / runner.METRICS_FILE)
    assert [r["step"] for r in records] == list(range(STEPS))  # one line per step, not one per rank
    assert not [p.name for p in (out / name).iterdir() if p.name.startswith(".")]
    # the checkpoint holds the state both ranks ended with
    trainer = make_trainer(name)
    ckpt.load_checkpoint(trainer, out / name)
    state = full_state(trainer)
    different = [k for k in state if k != "counters" and not torch.equal(state[k], r0["state"][k])]
    assert not different


CONFIG = """
[run]
problem = "toy2d"
steps = 4
out_dir = "{out}"
checkpoint_every = 2
keep = 0
seed = 1
eval_every = 4
eval_samples = 100

[train]
batch_size = 16
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


def test_cli_train_and_resume_under_torchrun(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.replace("{out}", str(out)))
    # cli.main as `python -m diffinstruct` runs it, observed at its teardown
    first = torchrun([str(Path(__file__).resolve()), "--cli", str(tmp_path), "train", "--config", str(config),
                      "--no-progress"], cwd=tmp_path)
    check_teardown(tmp_path)
    summary = json.loads(first.stdout)  # exactly one summary: only rank 0 prints
    assert summary["completed"] == 4 and summary["checkpoint"].endswith("step-000004")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert [r["step"] for r in read_jsonl(out / runner.METRICS_FILE)] == [0, 1, 2, 3]
    assert [r["step"] for r in read_jsonl(out / runner.EVAL_FILE)] == [4]
    meta = ckpt.read_meta(out)
    assert meta["metadata"]["world_size"] == WORLD and meta["step"] == 4

    second = torchrun(["-m", "diffinstruct", "train", "--config", str(config), "--no-progress", "--resume",
                       "--steps", "6"], cwd=tmp_path)
    summary = json.loads(second.stdout)
    assert summary["start_step"] == 4 and summary["completed"] == 6
    assert summary["resumed_from"].endswith("step-000004")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4, 6]
    assert [r["step"] for r in read_jsonl(out / runner.METRICS_FILE)] == list(range(6))


# ============================================================================================== single process
def test_single_process_is_untouched(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = distributed.init_from_env()
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    assert not distributed.active() and distributed.is_main()
    trainer = make_trainer("dipp")
    assert distributed.wrap_trainer(trainer) is None and trainer.ddp is None
    assert distributed.any_rank(False) is False and distributed.broadcast_object("x") == "x"
    distributed.barrier()
    distributed.cleanup(env)
    with pytest.raises(RuntimeError, match="no process group"):
        distributed.wrap_trainer(make_trainer("dipp", rank=1, world_size=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init_from_env()


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        raise SystemExit(cli_worker(Path(sys.argv[2]), sys.argv[3:]))
    worker(Path(sys.argv[1]))
