"""Which backend runs a kernel call, what each backend can run here, and forcing one.

Three backends: "cpu" (the C extension's kernels), "cuda" (the same extension's lazily loaded
CUDA library) and "reference" (the pure-PyTorch twins in reference.py). By default the inputs
decide: CUDA tensors go to "cuda", everything else to "cpu"; where those are missing the
reference stands in (with a warning). `use_backend(name)` (a context manager, per thread and
task) or the environment variable DIPP_BACKEND (read at import) force one: the forced backend
runs every call it can run, i.e. the ops it has, on the devices it serves; the rest keep their
default. op_reason() says why a backend cannot run an op here; ops.backends() (kernels.backends())
lists that for every op of the table.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

from ..errors import BackendUnavailable, CudaFallbackWarning, NoBackend
from . import backend
from .spec import Op

NAMES = ("cpu", "cuda", "reference")
AUTO = "auto"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("diffinstruct_kernels_backend", default=None)
_ENV = (os.environ.get("DIPP_BACKEND") or "").strip().lower() or None
_env_usable = False  # DIPP_BACKEND named a backend that turned out to be available


def _unknown(name: Any, where: str) -> ValueError:
    return ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(NAMES)} (or {AUTO!r})")


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot run anything here, or None when it can."""
    if name in ("cpu", "cuda") and not backend.HAVE_EXTENSION:
        return f"the C extension is not built ({backend.EXTENSION_ERROR})"
    if name == "reference" and backend.torch is None:
        return "torch is not installed"
    if name == "cuda":
        loaded, path, reason = backend.core.cuda_status(load=True)
        if not loaded:
            return f"the CUDA kernel library is not loaded ({reason or path})"
        if backend.torch is None or not backend.torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def op_reason(name: str, op: Op) -> str | None:
    """Why backend `name` cannot run `op` here, or None when it can."""
    if name == "cuda" and not op.cuda:
        return f"{op.name} runs on the CPU whatever the inputs (a host-side computation)"
    if name == "reference" and op.reference is None:
        return f"{op.name} has no PyTorch reference (a host-side computation of the C extension)"
    return unavailable_reason(name)


def _check(name: str, where: str) -> None:
    if name not in NAMES:
        raise _unknown(name, where)
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"diffinstruct: {where} asks for the {name!r} backend, which cannot run here: "
                                 f"{reason}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, run kernel calls on `name` where it can run them ('auto': the default choice)."""
    if name != AUTO:
        _check(name, f"use_backend({name!r})")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> str | None:
    """The backend forced here (use_backend, else DIPP_BACKEND), or None for the default choice."""
    name = _forced.get()
    if name is None:
        name = _ENV
        if name is not None and name != AUTO and not _env_usable:
            _check_env(name)
    return None if name == AUTO else name


def _check_env(name: str) -> None:
    global _env_usable
    _check(name, f"DIPP_BACKEND={name}")  # raises on every call until the environment is fixed
    _env_usable = True


def _device_of(lead: Any) -> str:
    if isinstance(lead, (list, tuple)):
        lead = lead[0] if lead else None
    return "cuda" if backend.is_cuda(lead) else "cpu"


@functools.cache
def _warn_cuda_fallback(reason: str) -> None:
    """One warning per process (per distinct reason) that CUDA tensors take the reference, whatever
    the warning filters: every kernel call would repeat it otherwise."""
    warnings.warn(f"diffinstruct: CUDA tensors are handled by the PyTorch reference (slower): {reason}. "
                  "The fused CUDA kernels need a usable libdipp_cuda.so (see kernels.cuda_backend_status())",
                  CudaFallbackWarning, stacklevel=5)


def select(op: Op, lead: Any) -> str:
    """The backend for one call of `op` whose first tensor argument is `lead`."""
    device = _device_of(lead)
    name = forced()
    if name is not None and op_reason(name, op) is None and name in ("reference", device):
        return name
    if device == "cuda" and op.cuda and backend.HAVE_EXTENSION:
        if backend.cuda_kernels_loaded():
            return "cuda"
        if op.reference is not None:  # without the extension at all, its import warned once already
            _, path, reason = backend.core.cuda_status()
            _warn_cuda_fallback(reason or str(path))
            return "reference"
    if backend.HAVE_EXTENSION:
        return "cpu"
    if op.reference is not None and backend.torch is not None:
        return "reference"
    reasons = "; ".join(f"{b}: {op_reason(b, op)}" for b in NAMES)
    raise NoBackend(f"diffinstruct: nothing here can run {op.name} ({reasons}); install the package with "
                    "'pip install .' or run 'make build' for the C extension")
