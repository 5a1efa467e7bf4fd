"""The C extension (CPU kernels, and its lazily loaded CUDA library) and handing tensors to it.

Which backend runs a call is registry.py's choice; this module loads the extension, says whether
its CUDA library is usable, and turns tensors into what the binding reads.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from ..errors import NoExtensionWarning

try:
    import torch
    from torch.utils.dlpack import to_dlpack as _to_dlpack
except ImportError:  # the kernels also work on NumPy arrays alone
    torch = None  # type: ignore[assignment]
    _to_dlpack = None  # type: ignore[assignment]
to_dlpack = _to_dlpack  # torch's C entry (ops._plain_list's path for plain CPU tensors)


class _ReferenceOnly:
    """Stands in for the C extension when it is missing (e.g. the repository cloned into ComfyUI's
    custom_nodes/ without a build): the registry then sends every call to the reference; what still
    reaches this object directly fails with a message naming the fix."""

    def __init__(self, error: ImportError) -> None:
        self.error = error

    def cuda_status(self, load: bool = False) -> tuple[bool, str | None, str]:
        return False, None, f"the C extension is not built ({self.error})"

    def __getattr__(self, name: str) -> Any:
        raise ImportError(f"diffinstruct: {name} needs the C extension, which is not built ({self.error}); "
                          "install the package with 'pip install .' or run 'make build'")


EXTENSION_ERROR: str | None = None
try:
    from .. import _core

    core: Any = _core
    HAVE_EXTENSION = True
except ImportError as error:
    core = _ReferenceOnly(error)
    HAVE_EXTENSION = False
    EXTENSION_ERROR = str(error)
    warnings.warn(f"diffinstruct: the C extension is not built ({error}); every kernel runs on the pure-PyTorch "
                  "reference (slower). Install with 'pip install .' or run 'make build' for the fused kernels.",
                  NoExtensionWarning, stacklevel=2)


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def is_cuda(x: Any) -> bool:
    return is_torch(x) and x.is_cuda


@functools.lru_cache(maxsize=1)
def cuda_kernels_loaded() -> bool:
    loaded, _path, _reason = core.cuda_status(load=True)
    return bool(loaded)


def cuda_backend_status() -> dict[str, Any]:
    """Whether the CUDA kernel library is present and loadable, and why not."""
    loaded, path, reason = core.cuda_status(load=True)
    return {"loaded": bool(loaded), "library": path, "reason": reason}


def stream_of(*tensors: Any) -> int:
    for t in tensors:
        if is_cuda(t):
            return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def plain(x: Any, name: str = "tensor") -> Any:
    """What the binding may read: tensors leave autograd (same storage); lazy negation/conjugation
    views, which DLPack cannot express (the binding would read them with the wrong sign), are
    materialised; CPU tensors become DLPack capsules through torch's C entry point (~1 us, where
    Tensor.__dlpack__ costs ~7 us). A tensor DLPack cannot carry raises BufferError naming `name`."""
    if torch is None or not isinstance(x, torch.Tensor):
        return x
    if x.requires_grad:
        x = x.detach()
    if x.is_neg() or x.is_conj():
        x = x.resolve_neg().resolve_conj()
    if not x.is_cpu:
        return x
    try:
        return _to_dlpack(x)
    except (RuntimeError, BufferError, TypeError, ValueError) as error:  # quantized, opaque storage, ...
        raise BufferError(f"{name}: cannot be passed through DLPack ({error})") from error


def refuse_lazy_output(x: Any, name: str) -> None:
    """An output must be the caller's own storage: a lazily negated/conjugated view cannot be written."""
    if is_torch(x) and (x.is_neg() or x.is_conj()):
        raise ValueError(f"{name}: a lazily negated/conjugated view cannot be written in place; pass a plain tensor")


def plain_out(x: Any, name: str = "out") -> Any:
    """What the binding may write: the caller's own storage, never a copy."""
    refuse_lazy_output(x, name)
    return plain(x, name)
