"""The binding's argument checks in Python, for the backends that do not run the binding.

validate(op, args) refuses exactly the calls the C entry point refuses, with the same exception
type and message, in the same order (the op's declaration in spec.py holds that order), and
returns the parsed values for the reference. The public API's own checks (the kinds of its
arguments, its Python-only flags) have already run by then, so a tensor here is a dense CPU or
CUDA torch.Tensor or a numpy.ndarray. tests/ops/ holds, per op, the calls that must fail alike.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import plain, torch
from .scalars import fmt_g, shape_text, tp_name
from .spec import IN, Op, Tensor, TensorList

MAX_DIMS = 16
VIEW_NAMES = ("float32", "float16", "bfloat16", "float64", "int64")  # the binding's order, for messages
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8}
_NUMPY = {np.dtype(t).num: n for t, n in ((np.float32, "float32"), (np.float16, "float16"),
                                          (np.float64, "float64"), (np.int64, "int64"))}
_TORCH = {} if torch is None else {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                                   torch.float64: "float64", torch.int64: "int64"}


@dataclass
class View:
    """What the binding knows of one tensor argument."""

    name: str
    role: str
    obj: Any
    dtype: str
    shape: tuple[int, ...]
    numel: int
    device: tuple[str, int]
    start: int

    @property
    def end(self) -> int:
        return self.start + self.numel * ITEMSIZE[self.dtype]


@functools.cache
def _dlpack_dtype_text(dtype: Any) -> str:
    """How the binding names a torch dtype it does not take: by its DLPack code, read from a capsule."""
    try:
        capsule = torch.utils.dlpack.to_dlpack(torch.empty(1, dtype=dtype))
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        # DLTensor: data pointer, device (two int32), ndim (int32), then dtype (uint8 code, uint8 bits, uint16 lanes)
        code, bits, lanes = struct.unpack_from("<BBH", ctypes.string_at(get(capsule, b"dltensor") + 20, 4))
    except (RuntimeError, BufferError, TypeError, ValueError):  # a dtype DLPack cannot carry at all
        return str(dtype)
    return f"DLPack code {code} bits {bits} lanes {lanes}"


def _torch_dtype_text(x: Any, name: str) -> str:
    known = _TORCH.get(x.dtype)
    if known is not None:
        return known
    if x.is_cpu:
        plain(x, name)  # what DLPack cannot carry fails here, with the C path's BufferError
        return _dlpack_dtype_text(x.dtype)
    try:  # the binding asks a CUDA tensor for its capsule itself
        try:
            x.__dlpack__(stream=-1, max_version=(1, 0))
        except TypeError:
            x.__dlpack__(stream=-1)
    except Exception as error:
        raise BufferError(f"{name}: __dlpack__() failed ({tp_name(type(error))}: {error})") from error
    return _dlpack_dtype_text(x.dtype)


def _check_dtype(got: str | None, text: str, name: str, dtypes: tuple[str, ...]) -> str:
    if got in dtypes:
        return got
    allowed = ", ".join(n for n in VIEW_NAMES if n in dtypes)
    raise TypeError(f"{name}: expected dtype {allowed}, got {text}")


def acquire(x: Any, name: str, role: str, dtypes: tuple[str, ...]) -> View:
    """The checks of call_tensor: kind of storage, dtype, layout, writability, size."""
    if x is None:
        raise TypeError(f"{name}: a tensor is required, got None")
    if isinstance(x, np.ndarray):
        text = tp_name(x.dtype.type)
        dtype = _check_dtype(_NUMPY.get(x.dtype.num), text, name, dtypes)
        if not x.dtype.isnative:
            raise TypeError(f"{name}: expected native byte order")
        if x.ndim > MAX_DIMS:
            raise ValueError(f"{name}: at most {MAX_DIMS} dimensions supported")
        if not (x.flags.c_contiguous and x.flags.aligned):
            raise ValueError(f"{name}: expected a C-contiguous, aligned array with positive strides "
                             "(use numpy.ascontiguousarray or tensor.contiguous())")
        if role != IN and not x.flags.writeable:
            raise ValueError(f"{name}: output array is read-only")
        shape, device, start = tuple(x.shape), ("cpu", 0), int(x.__array_interface__["data"][0])
    else:
        dtype = _check_dtype(_TORCH.get(x.dtype), _torch_dtype_text(x, name), name, dtypes)
        if x.dim() > MAX_DIMS:
            raise ValueError(f"{name}: at most {MAX_DIMS} dimensions supported")
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a C-contiguous tensor with positive strides (use tensor.contiguous())")
        shape, start = tuple(x.shape), x.data_ptr()
        device = (x.device.type, x.device.index or 0)
        if start % ITEMSIZE[dtype]:
            raise ValueError(f"{name}: data pointer is not aligned to its element size")
    numel = 1
    for d in shape:
        if d > 0 and numel > (2**63 - 1) // 16 // d:
            raise ValueError(f"{name}: too many elements")
        numel *= d
    if numel == 0:
        raise ValueError(f"{name}: is empty (zero elements)")
    return View(name, role, x, dtype, shape, numel, device, start)


def same_shape(a: View, b: View) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b.name} has shape {shape_text(b.shape)} but {a.name} has shape {shape_text(a.shape)}; "
                         "they must match")


def same_dtype(a: View, b: View) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{b.name} is {b.dtype} but {a.name} is {a.dtype}; they must share a dtype")


def per_sample(v: View, batch: int, of: str | None) -> None:
    if v.shape != (batch,):
        what = f"one value per sample of {of}" if of else "one value per sample"
        raise ValueError(f"{v.name}: expected shape ({batch},) ({what}), got {shape_text(v.shape)}")


def _values(v: View) -> np.ndarray:
    """The elements of a small per-sample vector or table, on the host."""
    if isinstance(v.obj, np.ndarray):
        return v.obj.reshape(-1)
    return v.obj.detach().reshape(-1).cpu().numpy()


def sigma_values(v: View) -> None:
    """Every element finite and > 0 (the binding checks float32 vectors only; others were refused)."""
    s = _values(v)
    bad = np.flatnonzero(~(np.isfinite(s) & (s > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{v.name}[{i}] must be finite and > 0, got {fmt_g(float(s[i]))}")


def table_values(v: View) -> None:
    if len(v.shape) != 1:
        raise ValueError("table: expected a non-empty 1-D sigma table")
    t = _values(v).astype(np.float64)
    unusable = ~(np.isfinite(t) & (t >= 0))
    unsorted = np.concatenate([[False], ~(t[1:] > t[:-1])])
    bad = np.flatnonzero(unusable | unsorted)
    if bad.size:
        i = int(bad[0])
        if unusable[i]:
            raise ValueError(f"table[{i}] must be finite and >= 0, got {fmt_g(t[i])}")
        raise ValueError(f"table must be strictly ascending, but table[{i}]={fmt_g(t[i])} <= "
                         f"table[{i - 1}]={fmt_g(t[i - 1])}")


def devices_and_overlap(views: list[View]) -> None:
    """One device for all; no output overlapping any other argument (the binding's sorted sweep)."""
    if not views:
        return
    first = views[0]
    for a in views[1:]:
        if a.device != first.device:
            raise ValueError(f"{a.name} is on {a.device[0]}:{a.device[1]} but {first.name} is on "
                             f"{first.device[0]}:{first.device[1]}; all tensors must share one device")
    end_all = end_out = 0
    holder_all: View | None = None
    holder_out: View | None = None
    for v in sorted(views, key=lambda view: view.start):
        clash = None
        if v.role != IN and holder_all is not None and v.start < end_all:
            clash = holder_all
        elif holder_out is not None and v.start < end_out:
            clash = holder_out
        if clash is not None:
            out, other = (v, clash) if v.role != IN else (clash, v)
            raise ValueError(f"{out.name} overlaps {other.name} in memory; outputs must not alias other arguments")
        if v.end > end_all:
            end_all, holder_all = v.end, v
        if v.role != IN and v.end > end_out:
            end_out, holder_out = v.end, v


def _tensors(op: Op, args: dict[str, Any]) -> list[View]:
    views: list[View] = []
    lead: View | None = None
    batch = 0
    for spec in op.tensors:
        assert isinstance(spec, Tensor)
        x = args[spec.name]
        if x is None and spec.optional:
            continue
        v = acquire(x, spec.name, spec.role, spec.dtypes)
        if spec.shape == "batch" and not v.shape:
            raise ValueError(f"{v.name}: expected a batch (at least one dimension), got a scalar")
        if spec.shape in ("lead", "batch", "vector"):
            if spec.shape == "vector":
                per_sample(v, v.numel, None)
            lead, batch = v, (v.shape[0] if v.shape else 0)
        elif spec.shape == "like":
            assert lead is not None
            same_shape(lead, v)
            same_dtype(lead, v)
        elif spec.shape == "sample":
            assert lead is not None
            per_sample(v, batch, lead.name)
        elif spec.shape == "table":
            table_values(v)
        if spec.values == "sigma":
            sigma_values(v)
        views.append(v)
    return views


def _lists(op: Op, args: dict[str, Any]) -> list[View]:
    lists = [(spec, args[spec.name]) for spec in op.tensors
             if isinstance(spec, TensorList) and not (spec.optional and args[spec.name] is None)]
    first_spec, first = lists[0]
    for spec, seq in lists[1:]:
        if len(seq) != len(first):
            raise ValueError(f"{spec.name} has {len(seq)} tensors but {first_spec.name} has {len(first)}")
    if not first:
        raise ValueError(f"{first_spec.name}: the list of tensors is empty")
    views: list[View] = []
    for i in range(len(first)):
        items = [acquire(seq[i], f"{spec.name}[{i}]", spec.role, spec.dtypes) for spec, seq in lists]
        for item in items[1:]:
            same_shape(items[0], item)
        views += items
    return views


def validate(op: Op, args: dict[str, Any]) -> dict[str, Any]:
    """The binding's checks of one call; the parsed scalars and the arguments, or the binding's error."""
    values = dict(args)
    for s in op.scalars:
        values[s.name] = s.parse(args[s.name], s.name)
    for s in op.scalars:
        if s.check is not None:
            s.check(s.name, values[s.name])
    if op.rules is not None:
        op.rules(values)
    lists = any(isinstance(spec, TensorList) for spec in op.tensors)
    devices_and_overlap(_lists(op, args) if lists else _tensors(op, args))
    return values


def cuda_values(op: Op, args: dict[str, Any]) -> None:
    """What the binding leaves unchecked on CUDA: sigma and table values, which live on the device.

    Checked only where the binding will accept the tensor otherwise (float32, the right shape),
    so that a malformed one still gets the binding's message about its form."""
    for spec in op.tensors:
        x = args.get(spec.name) if isinstance(spec, Tensor) and (spec.values or spec.shape == "table") else None
        if x is None or not (isinstance(x, torch.Tensor) and x.is_cuda and x.dtype == torch.float32):
            continue
        lead = args[op.lead]
        batch = lead.shape[0] if lead.dim() else 0
        if spec.values == "sigma" and tuple(x.shape) == (batch,) and x.is_contiguous():
            sigma_values(acquire(x, spec.name, spec.role, spec.dtypes))
        elif spec.shape == "table" and x.dim() == 1 and x.numel() > 0 and x.is_contiguous():
            table_values(acquire(x, spec.name, spec.role, spec.dtypes))
