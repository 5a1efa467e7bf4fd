"""Multi-process data-parallel training under torchrun: process group, DDP wrappers, rank-0-only I/O.

    python -m torch.distributed.run --nproc_per_node N -m diffinstruct train --config run.toml

Each rank draws its own batches (rng.stream_seed keys every draw by rank), so the effective batch of a step is
world_size * batch_size. The generator update is x0.backward(G) with G carrying 1/B_local, the TA update
d_ta.backward(grad) likewise; averaging the gradients over ranks therefore gives the mean over all
world_size * B_local samples, exactly what one process computes on the concatenated batches.

How gradients are averaged, per role (generator, TA):
  * when the role's module holds exactly the role's trainable parameters ("full" models, the toy problem), the
    module is wrapped in DistributedDataParallel and its backward pass all-reduces (averages) the gradients;
    with grad_accum > 1 only the last micro-batch synchronises (no_sync for the others);
  * otherwise (the shared-base LoRA mode: generator, TA and reference are views of one module, so a DDP wrapper
    would also own the other role's adapters) the role's parameters' gradients are averaged by hand: one flat
    all_reduce(SUM) / world_size right before the optimiser step (`DDPState.finish`).
Only the calls whose weights train go through a DDP wrapper: the generator in the generator step, the TA in the
TA step (and in the generator step under ta_sample = "onepass", whose TA forward there trains). No-grad forwards
and DI*'s pass through the frozen TA use the plain modules, so DDP never waits for gradients that do not come.

Every rank ends each step with bitwise identical parameters, EMA and optimiser states: they start from rank 0's
weights (DDP broadcasts them; the manual path does the same), apply identical averaged gradients, and skip a step
together (the non-finite counts are summed over ranks). Only rank 0 writes checkpoints, metrics and plots
(runner.py); on resume all ranks load the checkpoint rank 0 picked.

The process group: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from torchrun; "gloo" on the
CPU, "nccl" on CUDA devices (one per rank: cuda:LOCAL_RANK). Without WORLD_SIZE > 1 nothing is initialised and
every helper here is a no-op, so single-process runs are untouched.

Teardown (`cleanup`, called in a `finally` on every rank): the process group must be gone, its threads joined,
before the interpreter shuts down. A gloo worker thread drops its reference to a finished collective only after
the caller's wait() has returned; when that is the last reference to a tensor with a Python object, the drop needs
the GIL, and once Python is finalising a thread that asks for the GIL is made to exit (pthread_exit), a forced
unwind through the work's noexcept destructor: std::terminate, "terminate called without an active exception",
SIGABRT and torchrun exit 1 after a run that had finished. The ProcessGroupGloo destructor would join those
threads, but it never ran while Python was alive: destroy_process_group only drops c10d's references (gloo's
shutdown() does nothing), and two more kept the group alive: the DDP wrappers (module and reducer), and the
defaults `group=group.WORLD` of torch.distributed.nn.functional, bound at its first import, which DDP triggers
after the group exists. Hence init_from_env imports that module before creating the group, and cleanup releases
the DDP wrappers and then destroys the group, so that its last reference goes there, through c10d's holder that
releases the GIL while the destructor waits for the worker threads.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from .trainer import DITrainer

ROLES = ("generator", "ta")


@dataclass
class DistEnv:
    """This process's place in the job, from torchrun's environment (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # init_from_env created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def active() -> bool:
    """A process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return rank() == 0


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device | str | None = None) -> DistEnv:
    """Join the job torchrun started (WORLD_SIZE > 1), or describe a single process.

    device: where this rank trains; "cuda" becomes cuda:LOCAL_RANK (and the current device). The backend is
    "nccl" for CUDA, "gloo" otherwise. A process group that already exists is used as is.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank_ = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device if device is not None else "cpu")
    if world < 1 or not 0 <= rank_ < world:
        raise RuntimeError(f"RANK={rank_} and WORLD_SIZE={world} are inconsistent")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(0, 1, 0, dev, None, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend_for(dev)
    owns = False
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set; launch with "
                                   "`python -m torch.distributed.run --nproc_per_node N ...`")
        # before the group exists, so that the defaults `group=group.WORLD` this module binds at import are None
        # rather than a reference that keeps the group (and its threads) alive after destroy_process_group
        import torch.distributed.nn as _bind_defaults_now  # noqa: F401

        dist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world)
        owns = True
    else:
        backend = str(dist.get_backend())
    if dist.get_rank() != rank_ or dist.get_world_size() != world:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"RANK={rank_}, WORLD_SIZE={world}")
    return DistEnv(rank_, world, local, dev, backend, owns)


def cleanup(env: DistEnv, synchronize: bool | None = None) -> None:
    """Destroy the process group if init_from_env created it, and its communication threads with it.

    Call it in a `finally` around the run, on every rank. synchronize: meet the other ranks at a barrier first;
    by default only when no exception is propagating (a rank that failed may be alone: a barrier there would
    wait for the others until the timeout, or pair with a barrier they are at for another reason). The barrier
    makes the normal end symmetric; what prevents the abort at exit is that the group is gone before cleanup
    returns (see the module docstring). The DDP wrappers of every trainer wrapped meanwhile are released (the
    plain modules stay), so those trainers cannot train data-parallel any more.
    """
    if not (env.owns_group and dist.is_initialized()):
        return
    failing = sys.exc_info()[0] is not None
    if synchronize is None:
        synchronize = not failing
    try:
        if synchronize:
            barrier()
    finally:
        # DDP first, while c10d still references the group: its last reference must go in
        # destroy_process_group, whose holder releases the GIL before the destructor joins the worker threads
        # (one of them may need the GIL to drop its last work); gc for wrappers held only by reference cycles
        _release_ddp_wrappers()
        gc.collect()
        group = dist.group.WORLD
        try:
            alive: weakref.ref[Any] | None = weakref.ref(group) if group is not None else None
        except TypeError:
            alive = None
        del group
        dist.destroy_process_group()
        env.owns_group = False
    # while an exception propagates, its traceback's frames may still hold the group: nothing to report then
    if alive is not None and alive() is not None and not failing:
        warnings.warn("the process group is still referenced after destroy_process_group, so its communication "
                      "threads outlive it and may abort the process (std::terminate, SIGABRT) at interpreter exit",
                      RuntimeWarning, stacklevel=2)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it (any picklable value); unchanged in a single process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. an interrupt seen by one of them)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s values."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def average_gradients(params: Sequence[torch.Tensor], extra: float = 0.0) -> float:
    """Replace each p.grad by its mean over ranks in one flat all_reduce; returns `extra` summed over ranks.

    A parameter without a gradient on some rank counts as zero there (as in DDP); one without a gradient on
    every rank keeps grad None (so the optimiser skips it, as in a single process).
    """
    if not active():
        return extra
    n = world_size()
    wide = any(p.dtype == torch.float64 for p in params)
    dtype = torch.float64 if wide else torch.float32
    device = params[0].device if params else _comm_device()
    if dist.get_backend() == "gloo" and device.type != "cpu":
        device = torch.device("cpu")
    parts = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype)
             for p in params]
    used = torch.tensor([0.0 if p.grad is None else 1.0 for p in params] + [float(extra)], dtype=dtype, device=device)
    flat = torch.cat([*parts, used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    counts = flat[flat.numel() - len(params) - 1:-1]
    offset = 0
    for i, p in enumerate(params):
        size = p.numel()
        chunk = flat[offset:offset + size]
        offset += size
        if float(counts[i]) == 0.0:
            p.grad = None
            continue
        dtype_out = p.grad.dtype if p.grad is not None else p.dtype
        p.grad = (chunk / n).reshape(p.shape).to(p.device, dtype_out)
    return float(flat[-1])


def _owns_exactly(module: nn.Module, params: Sequence[nn.Parameter]) -> bool:
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    return trainable == {id(p) for p in params}


@dataclass
class DDPState:
    """What DITrainer uses when world_size > 1 (trainer.ddp); see the module docstring."""

    generator: nn.Module  # called wherever gradients flow into the generator's weights
    ta: nn.Module  # called in the TA step
    manual: dict[str, list[nn.Parameter]]  # roles averaged by hand (shared-base LoRA), by role name
    world_size: int

    def mode(self, role: str) -> str:
        return "manual" if role in self.manual else "ddp"

    def release(self) -> None:
        """Replace the DDP wrappers by the modules they wrap (the wrappers and their reducers hold the group)."""
        if isinstance(self.generator, DistributedDataParallel):
            self.generator = self.generator.module
        if isinstance(self.ta, DistributedDataParallel):
            self.ta = self.ta.module

    @contextmanager
    def micro(self, role: str, micro: int, count: int) -> Iterator[None]:
        """Around one micro-batch's forward and backward: DDP synchronises only on the last one."""
        module = self.generator if role == "generator" else self.ta
        last = micro == count - 1
        ctx = module.no_sync() if isinstance(module, DistributedDataParallel) and not last else nullcontext()
        with ctx:
            yield

    def finish(self, role: str, bad: int) -> int:
        """After the role's backward passes, before its optimiser step: averages hand-synced gradients and
        returns the number of non-finite samples over all ranks (so every rank skips, or steps, together)."""
        if role in self.manual:
            return int(round(average_gradients(self.manual[role], float(bad))))
        t = torch.tensor([float(bad)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(round(float(t.item())))


# every DDPState made over the running group, so that cleanup can release its wrappers even when a caller
# still holds the state or the trainer
_wrapped: list[weakref.ref[DDPState]] = []


def _release_ddp_wrappers() -> None:
    for ref in _wrapped:
        state = ref()
        if state is not None:
            state.release()
    _wrapped.clear()


def wrap_trainer(trainer: DITrainer, find_unused_parameters: bool = False) -> DDPState | None:
    """Make `trainer` data-parallel over the running process group (sets and returns trainer.ddp).

    Does nothing (returns None) in a single process. The trainer must have been built with this process's
    rank and world size (its random streams are keyed by rank). Rank 0's trainable weights and EMA are
    broadcast to every rank, so all start identical; frozen weights outside the wrapped modules (the reference,
    a shared LoRA base) are not: every rank builds them from the same files.
    """
    if not active():
        if trainer.world_size > 1:
            raise RuntimeError(f"the trainer was built for world_size={trainer.world_size} but no process group "
                               "is running (distributed.init_from_env)")
        return None
    if trainer.rank != dist.get_rank() or trainer.world_size != dist.get_world_size():
        raise RuntimeError(f"the trainer was built for rank {trainer.rank} of {trainer.world_size}, this process is "
                           f"rank {dist.get_rank()} of {dist.get_world_size()}")
    if getattr(trainer, "ddp", None) is not None:
        return trainer.ddp
    device = trainer.device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    modules = {"generator": trainer.models.generator, "ta": trainer.ta}
    params = {"generator": trainer.generator_params, "ta": trainer.ta_params}
    wrapped: dict[str, nn.Module] = {}
    manual: dict[str, list[nn.Parameter]] = {}
    for role in ROLES:
        if _owns_exactly(modules[role], params[role]):
            # broadcasts rank 0's parameters and buffers at construction
            wrapped[role] = DistributedDataParallel(modules[role], device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=find_unused_parameters)
        else:
            wrapped[role] = modules[role]
            manual[role] = list(params[role])
            broadcast_tensors([p.data for p in params[role]])
    broadcast_tensors(trainer.ema.shadow)
    state = DDPState(generator=wrapped["generator"], ta=wrapped["ta"], manual=manual,
                     world_size=dist.get_world_size())
    trainer.ddp = state
    _wrapped.append(weakref.ref(state))
    return state
