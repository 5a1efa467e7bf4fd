"""The training loop around DITrainer: resume, progress bar, metrics, checkpoints, curves, interruption.

An interrupted-and-resumed run ends bitwise identical to an uninterrupted one (on the same machine and
thread count): the random streams are stateless (rng.py) and a checkpoint holds every piece of mutable
state (trainable tensors, EMA, optimiser moments and step counts, the trainer's counters).

Files in out_dir: step-NNNNNN/ checkpoints and `latest` (checkpoint.py), metrics.jsonl (one line per
step, metrics.py), eval.jsonl (when an eval_fn is given), curves.png.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from . import distributed
from . import metrics as mlog
from .config import ConfigError

if TYPE_CHECKING:
    from .trainer import DITrainer

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CURVES_FILE = "curves.png"

EvalFn = Callable[["DITrainer", int], dict[str, Any]]


class RunDirError(ConfigError):
    """out_dir cannot be used as asked (it holds another run, or is ahead of `steps`)."""


def _positive_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@contextlib.contextmanager
def ema_weights(trainer: DITrainer) -> Iterator[None]:
    """Temporarily put the EMA weights into the generator; the training weights come back bit for bit."""
    params = trainer.generator_params
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
        for p, s in zip(params, trainer.ema.shadow, strict=True):
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)


class _StepBoundaryInterrupt:
    """Turns the first Ctrl-C into a request honoured between steps (so the checkpoint is of a whole step).

    A second Ctrl-C raises KeyboardInterrupt at once. Only the main thread can install the handler;
    elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing the current step, then writing a checkpoint "
              "(press Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StepBoundaryInterrupt:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


class _NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _postfix(record: dict[str, Any], last_eval: dict[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, label in (("ta_loss", "ta"), ("surrogate", "gen"), ("divergence", "div"), ("reward", "reward")):
        v = record.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            out[label] = f"{v:.4g}"
    if record.get("skipped_steps"):
        out["skipped"] = str(int(record["skipped_steps"]))
    if last_eval:
        for k, v in list(last_eval.items())[:2]:
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = f"{v:.4g}"
    return out


def _resume_point(out: Path, main: bool) -> Path | None:
    """The checkpoint every rank resumes from: rank 0's choice (ckpt.latest_checkpoint with hashes), or None.

    Damaged checkpoints are skipped with a warning; when none is usable, NoUsableCheckpoint is raised on every
    rank (the other ranks must not wait in the broadcast for a choice that never comes).
    """
    found: Path | None = None
    failure: str | None = None
    if main:
        try:
            found = ckpt.latest_checkpoint(out, verify=True) if out.is_dir() else None
        except ckpt.NoUsableCheckpoint as exc:
            failure = str(exc)
    found, failure = distributed.broadcast_object((found, failure))
    if failure is not None:
        raise ckpt.NoUsableCheckpoint(failure)
    return found


def run(trainer: DITrainer, steps: int, out_dir: str | Path, checkpoint_every: int, resume: bool, keep: int = 3,
        progress: bool = True, eval_fn: EvalFn | None = None, eval_every: int = 0,
        metadata: dict[str, Any] | None = None, curves: bool = True,
        curves_interval_s: float = 60.0) -> dict[str, Any]:
    """Train steps [start, steps) where start is 0, or the step of out_dir's latest checkpoint when resuming.

    checkpoint_every: save after every that many completed steps, and always after the last one.
    resume: continue from out_dir's latest usable checkpoint (starts at 0 when there is none); damaged ones are
        skipped with a warning, and checkpoints that are all damaged raise ckpt.NoUsableCheckpoint. Without
        resume, an out_dir that already holds checkpoints (damaged or not) is refused rather than overwritten.
    keep: newest checkpoints to keep (0 keeps all). eval_fn(trainer, completed_steps) -> metrics, called
        every `eval_every` completed steps and at the end, its results appended to eval.jsonl.
    metadata: stored in every checkpoint (a "base_model" key is also recorded at the top level).
    curves: write curves.png at the end, and at checkpoints at most every `curves_interval_s` seconds.
    Ctrl-C: the step in flight completes, a checkpoint of it is written, then KeyboardInterrupt propagates.
    Under torchrun (distributed.py) every rank calls this; only rank 0 writes files (checkpoints, metrics,
    evaluations, curves) and shows progress, every rank resumes from the checkpoint rank 0 picks, and the
    ranks meet at a barrier before and after each checkpoint.
    Returns a summary (steps run, last metrics and evaluation, paths, timing).
    """
    steps = _positive_int("steps", steps, 1)
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, 1)
    keep = _positive_int("keep", keep, 0)
    eval_every = _positive_int("eval_every", eval_every, 0)
    if eval_every and eval_fn is None:
        raise ConfigError("eval_every > 0 needs an eval_fn")
    out = Path(out_dir)
    main = distributed.is_main()
    metadata = dict(metadata or {})
    base_model = str(metadata.get("base_model", ""))

    start, resumed_from = 0, None
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir {out} exists and is not a directory")
    if resume:
        found = _resume_point(out, main)
        if found is not None:
            # rank 0 hashed every file while choosing it; hashing again on every rank would only cost time
            info = ckpt.load_checkpoint(trainer, found, verify=False)
            if info.step > steps:
                raise RunDirError(f"the latest checkpoint in {out} is {found.name}, beyond steps = {steps}; "
                                  "raise steps to continue that run")
            start, resumed_from = info.step, str(found)
    elif ckpt.checkpoint_dirs(out):  # damaged ones too: a fresh run would mix its files with theirs
        newest = ckpt.checkpoint_dirs(out)[-1][1].name
        raise RunDirError(f"out_dir {out} already holds a run (newest checkpoint {newest}); "
                          "resume it (--resume) or choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)

    log = mlog.open_log(out / METRICS_FILE, start) if main else _NullLog()  # keeps records of steps < start
    eval_log = None
    if eval_fn is not None:
        eval_log = mlog.open_log(out / EVAL_FILE, start, inclusive=False) if main else _NullLog()
    curves_ok = curves
    curves_path: Path | None = None
    curves_at = -math.inf

    def write_curves(final: bool) -> None:
        nonlocal curves_ok, curves_path, curves_at
        if not main or not curves_ok or (not final and time.monotonic() - curves_at < curves_interval_s):
            return
        curves_at = time.monotonic()
        try:
            curves_path = mlog.write_curves(out / METRICS_FILE, out / CURVES_FILE,
                                            title=f"{trainer.cfg.method} alpha={trainer.cfg.alpha:g}")
        except ImportError as exc:
            warnings.warn(f"no curves: {exc}", stacklevel=3)
            curves_ok = False

    def save(completed: int, final: bool = False) -> Path:
        distributed.barrier()
        if not main:
            distributed.barrier()  # rank 0 is writing
            return out / ckpt.step_dir_name(completed)
        path = ckpt.save_checkpoint(trainer, out, completed, keep=keep, metadata=metadata, base_model=base_model,
                                    total_steps=steps)
        write_curves(final=final or completed == steps)
        distributed.barrier()
        return path

    completed = start
    saved_at: int | None = start if resumed_from is not None else None
    last_ckpt: str | None = resumed_from
    last: dict[str, Any] = {}
    last_eval: dict[str, Any] | None = None
    in_step = False
    began = time.perf_counter()
    bar = _progress(steps, start, progress and main)
    guard = _StepBoundaryInterrupt()
    try:
        with guard:
            for step in range(start, steps):
                in_step = True
                record = trainer.train_step(step)
                in_step = False
                completed = step + 1
                log.write(record)
                last = record
                if main and eval_fn is not None and eval_log is not None and eval_every and (
                        completed % eval_every == 0 or completed == steps):
                    last_eval = dict(eval_fn(trainer, completed))
                    eval_log.write({"step": completed, **last_eval})
                    if bar is not None:
                        bar.write(f"eval @ {completed}: {mlog.encode(last_eval)}")
                if completed % checkpoint_every == 0 or completed == steps:
                    last_ckpt = str(save(completed))
                    saved_at = completed
                if bar is not None:
                    bar.set_postfix(_postfix(record, last_eval), refresh=False)
                    bar.update(1)
                if distributed.any_rank(guard.requested):  # all ranks stop after the same step
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if in_step or guard.forced:
            where = f"inside step {completed}: its state is partial, so" if in_step else "at once:"
            print(f"\ninterrupted {where} no checkpoint was written; resuming continues from "
                  f"{Path(last_ckpt).name if last_ckpt else 'step 0'}", file=sys.stderr, flush=True)
        elif completed > 0 and saved_at != completed:
            last_ckpt = str(save(completed, final=True))
            if main:
                print(f"\ninterrupted: checkpoint {last_ckpt} written after {completed} steps", file=sys.stderr,
                      flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()
        if eval_log is not None:
            eval_log.close()
    if start == steps:  # nothing left to run
        write_curves(final=True)
    wall = time.perf_counter() - began
    ran = completed - start
    return {
        "out_dir": str(out),
        "resumed_from": resumed_from,
        "start_step": start,
        "steps": steps,
        "completed": completed,
        "checkpoint": last_ckpt,
        "metrics": str(out / METRICS_FILE),
        "curves": str(curves_path) if curves_path else None,
        "last": mlog.jsonable(last),
        "eval": mlog.jsonable(last_eval) if last_eval is not None else None,
        "skipped_steps": trainer.skipped_steps,
        "wall_seconds": wall,
        "seconds_per_step": wall / ran if ran else None,
    }
