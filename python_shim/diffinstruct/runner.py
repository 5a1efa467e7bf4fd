"""The one training loop around DITrainer: resume, metrics, checkpoints, curves, evaluation, interruption.

    summary = runner.run(trainer, RunOptions(steps, out_dir, checkpoint_every, resume=True), hooks)

Every host trains through `run`: the command line and the tiny demo with ConsoleHooks (tqdm bar, Ctrl-C
honoured between steps), the ComfyUI nodes with their own hooks (ComfyUI's progress bar and Cancel button,
comfyui/training.py), the memory benchmark with hooks that record each step and no run folder.

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
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from . import distributed
from . import metrics as mlog
from .checks import check_int, is_finite_number
from .errors import ConfigError, RunDirError

if TYPE_CHECKING:
    from .trainer import DITrainer

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CURVES_FILE = "curves.png"

EvalFn = Callable[["DITrainer", int], dict[str, Any]]


def _positive_int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low)


@dataclass
class RunOptions:
    """What one run does.

    steps: train steps [start, steps), start being 0 or the step of out_dir's latest usable checkpoint.
    out_dir: the run folder; None runs without files (no checkpoints, metrics, evaluations or curves).
    checkpoint_every: save after every that many completed steps, and always after the last one.
    resume: continue from out_dir's latest usable checkpoint (starts at 0 when there is none); damaged ones are
        skipped with a warning, and checkpoints that are all damaged raise ckpt.NoUsableCheckpoint. Without
        resume, an out_dir that already holds checkpoints (damaged or not) is refused rather than overwritten.
    keep: newest checkpoints to keep (0 keeps all).
    eval_fn(trainer, completed_steps) -> metrics: called every `eval_every` completed steps and at the end, its
        results appended to eval.jsonl.
    metadata: stored in every checkpoint (a "base_model" key is also recorded at the top level).
    curves: write curves.png at the end, and at checkpoints at most every `curves_interval_s` seconds.
    """

    steps: int
    out_dir: str | Path | None
    checkpoint_every: int
    resume: bool = False
    keep: int = 3
    eval_fn: EvalFn | None = None
    eval_every: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    curves: bool = True
    curves_interval_s: float = 60.0

    def check(self) -> RunOptions:
        """Itself, once every value is valid; ConfigError naming the option otherwise."""
        _positive_int("steps", self.steps, 1)
        _positive_int("checkpoint_every", self.checkpoint_every, 1)
        _positive_int("keep", self.keep, 0)
        _positive_int("eval_every", self.eval_every, 0)
        if self.eval_every and self.eval_fn is None:
            raise ConfigError("eval_every > 0 needs an eval_fn")
        return self


class RunHooks:
    """What a host sees of a run, and how it stops one; every hook here does nothing. Subclass to override.

    The loop calls, in order: started(start, steps); then per step before_step(step), the step,
    after_step(completed, record) and stop_requested() (polled on every rank; true on any stops all after the
    same step by raising KeyboardInterrupt); on_eval / on_checkpoint as they happen; close() at the end.
    An exception raised between steps (by a hook, or stop_requested's KeyboardInterrupt) first checkpoints the
    completed steps when checkpoint_on(exc) says so; interrupted(...) then reports it before it propagates.
    One raised inside a step never checkpoints: that step's state is partial.

    The class attributes word the run-folder refusals in the host's terms (str.format fields: out, newest,
    found, step, steps).
    """

    not_a_folder = "out_dir {out} exists and is not a directory"
    holds_a_run = ("out_dir {out} already holds a run (newest checkpoint {newest}); resume it (--resume) or choose "
                   "another out_dir")
    beyond_steps = ("the latest checkpoint in {out} is {found}, beyond steps = {steps}; raise steps to continue "
                    "that run")

    def interrupts(self) -> AbstractContextManager[Any]:
        """In force while steps run (ConsoleHooks turns Ctrl-C into a request honoured between steps)."""
        return contextlib.nullcontext()

    def started(self, start: int, steps: int) -> None:
        pass

    def before_step(self, step: int) -> None:
        """May raise to stop before `step` (ComfyUI's Cancel)."""

    def after_step(self, completed: int, record: dict[str, Any]) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def on_eval(self, completed: int, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, path: Path, completed: int) -> None:
        pass

    def checkpoint_on(self, exc: BaseException) -> bool:
        """Whether `exc`, raised between steps, should first checkpoint the completed steps."""
        return isinstance(exc, KeyboardInterrupt)

    def interrupted(self, exc: BaseException, completed: int, in_step: bool, written: Path | None,
                    resume_from: str | None) -> None:
        """`exc` stops the run after `completed` steps; written: the checkpoint just saved for it, if any;
        resume_from: the checkpoint a resumed run would continue from."""

    def close(self) -> None:
        pass


class _NullLog:
    """What ranks other than 0, and runs without a folder, log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


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


def start_point(trainer: DITrainer, options: RunOptions, hooks: RunHooks) -> tuple[int, Path | None]:
    """(start step, checkpoint resumed from or None), with that checkpoint loaded into `trainer`.

    Refuses (RunDirError, worded by `hooks`) an out_dir that is not a folder, one that holds a run when not
    resuming, and one whose run is beyond options.steps. Does not create out_dir.
    """
    if options.out_dir is None:
        return 0, None
    out = Path(options.out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(hooks.not_a_folder.format(out=out))
    if options.resume:
        found = _resume_point(out, distributed.is_main())
        if found is None:
            return 0, None
        # rank 0 hashed every file while choosing it; hashing again on every rank would only cost time
        info = ckpt.load_checkpoint(trainer, found, verify=False)
        if info.step > options.steps:
            raise RunDirError(hooks.beyond_steps.format(out=out, found=found.name, step=info.step,
                                                        steps=options.steps))
        return info.step, found
    dirs = ckpt.checkpoint_dirs(out)
    if dirs:  # damaged ones too: a fresh run would mix its files with theirs
        raise RunDirError(hooks.holds_a_run.format(out=out, newest=dirs[-1][1].name))
    return 0, None


class _Run:
    """One call of `run`: its files, counters and the step loop, split up to keep each part readable."""

    def __init__(self, trainer: DITrainer, options: RunOptions, hooks: RunHooks) -> None:
        self.trainer, self.options, self.hooks = trainer, options, hooks
        self.out = Path(options.out_dir) if options.out_dir is not None else None
        self.main = distributed.is_main()
        self.metadata = dict(options.metadata)
        self.start, resumed = start_point(trainer, options, hooks)
        self.resumed_from = str(resumed) if resumed is not None else None
        self.completed = self.saved = self.start
        self.last_ckpt = self.resumed_from
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.curves_ok = options.curves
        self.curves_path: Path | None = None
        self.curves_at = -math.inf
        self.log: Any = _NullLog()
        self.eval_log: Any = _NullLog() if options.eval_fn is not None else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.out is not None and self.main:
            # keeps the records of steps < start, drops later ones (a resumed run writes them again)
            self.log = mlog.open_log(self.out / METRICS_FILE, self.start)
            if options.eval_fn is not None:
                self.eval_log = mlog.open_log(self.out / EVAL_FILE, self.start, inclusive=False)

    def write_curves(self, final: bool) -> None:
        if not self.main or self.out is None or not self.curves_ok or (
                not final and time.monotonic() - self.curves_at < self.options.curves_interval_s):
            return
        self.curves_at = time.monotonic()
        cfg = self.trainer.cfg
        try:
            self.curves_path = mlog.write_curves(self.out / METRICS_FILE, self.out / CURVES_FILE,
                                                 title=f"{cfg.method} alpha={cfg.alpha:g}")
        except ImportError as exc:
            warnings.warn(f"no curves: {exc}", stacklevel=3)
            self.curves_ok = False

    def save(self, final: bool = False) -> Path | None:
        """Checkpoint the completed steps (rank 0 writes; every rank meets it at a barrier before and after)."""
        if self.out is None:
            return None
        completed = self.completed
        distributed.barrier()
        if not self.main:
            distributed.barrier()  # rank 0 is writing
            path = self.out / ckpt.step_dir_name(completed)
        else:
            path = ckpt.save_checkpoint(self.trainer, self.out, completed, keep=self.options.keep,
                                        metadata=self.metadata, base_model=str(self.metadata.get("base_model", "")),
                                        total_steps=self.options.steps)
            self.write_curves(final=final or completed == self.options.steps)
            distributed.barrier()
        self.saved, self.last_ckpt = completed, str(path)
        self.hooks.on_checkpoint(path, completed)
        return path

    def evaluate(self) -> None:
        opts = self.options
        if not (self.main and opts.eval_fn is not None and self.eval_log is not None and opts.eval_every):
            return
        if self.completed % opts.eval_every == 0 or self.completed == opts.steps:
            self.last_eval = dict(opts.eval_fn(self.trainer, self.completed))
            self.eval_log.write({"step": self.completed, **self.last_eval})
            self.hooks.on_eval(self.completed, self.last_eval)

    def train(self) -> None:
        """Steps [start, steps); see RunHooks for what happens when something stops them."""
        opts, hooks = self.options, self.hooks
        in_step = False
        try:
            with hooks.interrupts():
                for step in range(self.start, opts.steps):
                    hooks.before_step(step)
                    in_step = True
                    record = self.trainer.train_step(step)
                    in_step = False
                    self.completed = step + 1
                    self.log.write(record)
                    self.last = record
                    self.evaluate()
                    if self.completed % opts.checkpoint_every == 0 or self.completed == opts.steps:
                        self.save()
                    hooks.after_step(self.completed, record)
                    if distributed.any_rank(hooks.stop_requested()):  # all ranks stop after the same step
                        raise KeyboardInterrupt
        except BaseException as exc:
            written = None
            if not in_step and self.completed > self.saved and hooks.checkpoint_on(exc):
                written = self.save(final=True)
            hooks.interrupted(exc, self.completed, in_step, written, self.last_ckpt)
            raise

    def close(self) -> None:
        self.log.close()
        if self.eval_log is not None:
            self.eval_log.close()

    def summary(self, wall: float) -> dict[str, Any]:
        ran = self.completed - self.start
        return {
            "out_dir": str(self.out) if self.out is not None else None,
            "resumed_from": self.resumed_from,
            "start_step": self.start,
            "steps": self.options.steps,
            "completed": self.completed,
            "checkpoint": self.last_ckpt,
            "metrics": str(self.out / METRICS_FILE) if self.out is not None else None,
            "curves": str(self.curves_path) if self.curves_path else None,
            "last": mlog.jsonable(self.last),
            "eval": mlog.jsonable(self.last_eval) if self.last_eval is not None else None,
            "skipped_steps": self.trainer.skipped_steps,
            "wall_seconds": wall,
            "seconds_per_step": wall / ran if ran else None,
        }


def run(trainer: DITrainer, options: RunOptions, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Train `trainer` as `options` say, telling `hooks` (default: ConsoleHooks()) as it goes.

    Ctrl-C under ConsoleHooks: the step in flight completes, a checkpoint of it is written, then KeyboardInterrupt
    propagates; a second Ctrl-C stops at once without one.
    Under torchrun (distributed.py) every rank calls this; only rank 0 writes files (checkpoints, metrics,
    evaluations, curves) and shows progress, every rank resumes from the checkpoint rank 0 picks, and the
    ranks meet at a barrier before and after each checkpoint.
    Returns a summary (steps run, last metrics and evaluation, paths, timing).
    """
    if hooks is None:
        hooks = ConsoleHooks()
    state = _Run(trainer, options.check(), hooks)
    began = time.perf_counter()
    hooks.started(state.start, options.steps)
    try:
        state.train()
    finally:
        hooks.close()
        state.close()
    if state.start == options.steps:  # nothing left to run
        state.write_curves(final=True)
    return state.summary(time.perf_counter() - began)


# ============================================================================================== the console
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
            if is_finite_number(v):
                out[k] = f"{v:.4g}"
    return out


class ConsoleHooks(RunHooks):
    """A terminal's run: a tqdm bar on rank 0 (progress=True and tqdm installed), Ctrl-C between steps.

    The first Ctrl-C lets the step in flight complete, checkpoints it and stops (KeyboardInterrupt); a second
    one stops at once, without a checkpoint. What happened is printed to stderr.
    """

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self._guard = _StepBoundaryInterrupt()
        self._bar: Any = None
        self._last_eval: dict[str, Any] | None = None

    def interrupts(self) -> AbstractContextManager[Any]:
        return self._guard

    def started(self, start: int, steps: int) -> None:
        self._guard, self._last_eval = _StepBoundaryInterrupt(), None  # nothing carries over from an earlier run
        if not (self.progress and distributed.is_main()):
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def after_step(self, completed: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_postfix(record, self._last_eval), refresh=False)
            self._bar.update(1)

    def stop_requested(self) -> bool:
        return self._guard.requested

    def on_eval(self, completed: int, metrics: dict[str, Any]) -> None:
        self._last_eval = metrics
        if self._bar is not None:
            self._bar.write(f"eval @ {completed}: {mlog.encode(metrics)}")

    def checkpoint_on(self, exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt) and not self._guard.forced

    def interrupted(self, exc: BaseException, completed: int, in_step: bool, written: Path | None,
                    resume_from: str | None) -> None:
        if not isinstance(exc, KeyboardInterrupt):
            return
        if in_step or self._guard.forced:
            where = f"inside step {completed}: its state is partial, so" if in_step else "at once:"
            print(f"\ninterrupted {where} no checkpoint was written; resuming continues from "
                  f"{Path(resume_from).name if resume_from else 'step 0'}", file=sys.stderr, flush=True)
        elif written is not None and distributed.is_main():
            print(f"\ninterrupted: checkpoint {written} written after {completed} steps", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
