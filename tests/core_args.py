"""Valid arguments of every diffinstruct._core entry point, and the bad ones tests change them with.

`valid_kwargs(fn)` gives a fresh valid call of _core.<fn>; each bad-input case (`case(...)`, in
tests/ops/test_<op>.py) changes one thing and names the exception and message it must raise. The
garbage DLPack producers and the hand-made (forged) capsules feed the binding what a torch.Tensor
never would. `tt` builds the public API's seeded torch inputs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from diffinstruct import _core

B, N = 2, 6  # batch, elements per sample of the small tensors below
RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- builders


def f32(*shape: int, lo: float = 0.5, hi: float = 1.5) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def empty(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def step_slice(*shape: int) -> np.ndarray:
    """Non-contiguous along the last axis: every second element."""
    full = np.zeros((*shape[:-1], 2 * shape[-1]), np.float32)
    return full[..., ::2]


def transposed(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) torch view with transposed strides."""
    return torch.zeros(cols, rows).t()


def overlapping_pair(shape: tuple[int, ...], shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Two views of one buffer; the second starts `shift` elements after the first."""
    n = int(np.prod(shape))
    buf = np.zeros(n + shift, np.float32)
    return buf[:n].reshape(shape), buf[shift : shift + n].reshape(shape)


def sigma_and_output_sharing_memory() -> dict[str, np.ndarray]:
    """sigma = buf[0:B] (valid values) and xt_out = buf[1:1+B*N]: they share element 1."""
    buf = np.zeros(B * N + 1, np.float32)
    buf[:B] = 1.0
    return {"sigma": buf[:B], "xt_out": buf[1 : 1 + B * N].reshape(B, N)}


def valid_kwargs(fn: str) -> dict[str, Any]:
    """Fresh, valid keyword arguments for _core.<fn>."""
    if fn in ("fill_uniform", "fill_normal"):
        return {"out": empty(B, N), "seed": 1, "offset": 0}
    if fn == "sample_sigma":
        return {
            "sigma_out": empty(B),
            "seed": 1,
            "offset": 0,
            "p_mean": -1.2,
            "p_std": 1.2,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
            "table": np.linspace(0.01, 100.0, 16, dtype=np.float32),
            "index_out": empty(B, dtype=np.int64),
            "snap": True,
        }
    if fn == "sigma_table":
        return {"kind": "iddpm_linear", "steps": 16}
    if fn == "precond":
        outs = {k: empty(B) for k in ("c_skip", "c_out", "c_in", "c_noise", "weight")}
        return {"sigma": vec(0.5, 2.0), **outs, "kind": "edm", "sigma_data": 0.5}
    if fn == "add_noise":
        return {
            "x0": f32(B, N),
            "sigma": vec(0.5, 2.0),
            "xt_out": empty(B, N),
            "seed": 1,
            "offset": 0,
            "eps_out": empty(B, N),
            "flow": False,
        }
    if fn == "cfg_combine":
        return {"uncond": f32(B, N), "cond": f32(B, N), "out": empty(B, N), "omega": 1.5}
    if fn == "ta_loss":
        return {
            "d_ta": f32(B, N),
            "x0": f32(B, N),
            "loss_out": empty(B),
            "sigma": vec(0.5, 2.0),
            "grad_out": empty(B, N),
            "nonfinite_out": empty(B, dtype=np.int64),
            "weighting": "edm",
            "sigma_data": 0.5,
            "reduction": "mean",
        }
    if fn == "generator_grad":
        return {
            "x0": f32(B, N),
            "d_ta": f32(B, N),
            "d_cond": f32(B, N),
            "grad_out": empty(B, N),
            "weight_out": empty(B),
            "ref_dist_out": empty(B),
            "gap_out": empty(B),
            "surrogate_out": empty(B),
            "nonfinite_out": empty(B, dtype=np.int64),
            "d_uncond": f32(B, N),
            "omega": 2.0,
            "dr": f32(B, N),
            "alpha": 0.1,
            "weighting": "normalized",
            "min_norm": 1e-5,
        }
    if fn == "huber_terms":
        kw = {"x0": f32(B, N), "d_p": f32(B, N), "d_q": f32(B, N), "sigma": vec(0.5, 2.0)}
        kw.update({k: empty(B, N) for k in ("a_out", "b_out", "dprime_out")})
        kw.update({k: empty(B) for k in ("ysq_out", "yr_out", "h_out", "value_out")})
        kw.update({"nonfinite_out": empty(B, dtype=np.int64), "c": 0.1, "weighting": "sigma2"})
        return kw
    if fn == "ema_update":
        return {"ema": [f32(2, 3), f32(5)], "params": [f32(2, 3), f32(5)], "decay": 0.99}
    if fn == "adam_step":
        return {
            "params": [f32(2, 3), f32(5)],
            "grads": [f32(2, 3), f32(5)],
            "exp_avgs": [empty(2, 3), empty(5)],
            "exp_avg_sqs": [empty(2, 3), empty(5)],
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "step": 1,
            "decoupled": False,
        }
    if fn == "stream_copy":
        return {"a": empty(16), "b": f32(16)}
    if fn == "stream_triad":
        return {"a": empty(16), "b": f32(16), "c": f32(16), "scalar": 3.0}
    raise KeyError(fn)


FUNCTIONS = [
    "fill_uniform",
    "fill_normal",
    "sample_sigma",
    "sigma_table",
    "precond",
    "add_noise",
    "cfg_combine",
    "ta_loss",
    "generator_grad",
    "huber_terms",
    "ema_update",
    "adam_step",
    "stream_copy",
    "stream_triad",
]



# --------------------------------------------------------------------------- garbage producers


class NotTensor:
    """Neither an array nor a DLPack producer."""


class NonCapsuleProducer:
    """__dlpack__ returns something that is not a capsule."""

    def __dlpack__(self, **kwargs):
        return 42

    def __dlpack_device__(self):
        return (1, 0)


class DeviceNotTuple(NonCapsuleProducer):
    def __dlpack_device__(self):
        return "cpu"


class DeviceWrongArity(NonCapsuleProducer):
    def __dlpack_device__(self):
        return (1, 0, 0)


class DeviceNotInts(NonCapsuleProducer):
    def __dlpack_device__(self):
        return (1.0, "0")


class DeviceRaises(NonCapsuleProducer):
    def __dlpack_device__(self):
        raise KeyError("no device")


class DeviceUnsupported:
    """A device type the binding does not handle (CUDA managed memory)."""

    def __init__(self):
        self.t = torch.zeros(B, N)

    def __dlpack__(self, **kwargs):
        return self.t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (13, 0)


class DeviceLies(DeviceUnsupported):
    """Claims CUDA but exports a CPU tensor."""

    def __dlpack_device__(self):
        return (2, 0)


class NoDeviceMethod:
    def __dlpack__(self, **kwargs):
        return torch.zeros(B, N).__dlpack__(**kwargs)


class DlpackRaises(NonCapsuleProducer):
    def __dlpack__(self, **kwargs):
        raise RuntimeError("producer failure")


class DlpackNotCallable(NonCapsuleProducer):
    __dlpack__ = 5  # type: ignore[assignment]


class ReusedCapsule:
    """Returns one capsule every time: the second use finds it consumed."""

    def __init__(self):
        self.capsule = torch.zeros(B, N).__dlpack__()
        _core.fill_uniform(self, 0)  # consumes it

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


# DLPack structures, for hand-made (forged) capsules.
class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

FLAG_READ_ONLY, FLAG_IS_COPIED = 1, 2


class Forged:
    """A DLPack producer over a NumPy buffer whose capsule fields can be falsified.

    `deleted` counts calls of the managed tensor's deleter (the binding must call
    it exactly once per consumed capsule)."""

    def __init__(
        self,
        shape=(B, N),
        *,
        versioned=True,
        major=1,
        flags=0,
        device=(1, 0),
        capsule_device=None,
        dtype=(2, 32, 1),
        strides=None,
        null_shape=False,
        null_data=False,
        byte_offset=0,
        name=None,
    ):
        self.buf = np.zeros(max(int(np.prod(shape)), 1) + 8, np.float32)
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = None if strides is None else (ctypes.c_int64 * len(strides))(*strides)
        self.device = device
        self.deleted = 0
        self.deleter = DELETER(self._delete)
        t = DLTensor()
        t.data = None if null_data else self.buf.ctypes.data
        t.device = DLDevice(*(capsule_device or device))
        t.ndim = len(shape)
        t.dtype = DLDataType(*dtype)
        t.shape = None if null_shape else ctypes.cast(self.shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = None if strides is None else ctypes.cast(self.strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = byte_offset
        if versioned:
            self.managed = DLManagedTensorVersioned(DLPackVersion(major, 0), None, self.deleter, flags, t)
        else:
            self.managed = DLManagedTensor(t, None, self.deleter)
        self.name = name or (b"dltensor_versioned" if versioned else b"dltensor")

    def _delete(self, _pointer):
        self.deleted += 1

    def __dlpack__(self, **kwargs):
        return _capsule_new(ctypes.addressof(self.managed), self.name, None)

    def __dlpack_device__(self):
        return self.device


# --------------------------------------------------------------------------- cases


class Case(NamedTuple):
    id: str
    fn: str
    make: Callable[[dict[str, Any]], dict[str, Any]]  # kwargs -> updates
    exc: type[BaseException]
    match: str


def case(id_: str, fn: str, exc: type[BaseException], match: str, make: Callable[[dict], dict]) -> Any:
    return pytest.param(Case(id_, fn, make, exc, match), id=id_)


TE, VE, BE = TypeError, ValueError, BufferError


def tt(*shape: int, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape) + 7)
    return (torch.rand(*shape, generator=g) + 0.5).to(dtype).requires_grad_(requires_grad)


# The same three binding checks run for every op's entry points; each per-op file makes its own copies from its
# CASES and FLOAT_SCALARS (`test_x = bad_input_test(CASES)`), so the tests keep their names and ids per op.
def bad_input_test(cases: list[Case]) -> Callable[[Case], None]:
    @pytest.mark.parametrize("c", cases)
    def test_bad_input(c: Case) -> None:
        kwargs = valid_kwargs(c.fn)
        kwargs.update(c.make(kwargs))
        with pytest.raises(c.exc, match=c.match):
            getattr(_core, c.fn)(**kwargs)

    return test_bad_input


def float_scalar_tests(float_scalars: list[tuple[str, str, bool]]) -> tuple[Callable[..., None], Callable[..., None]]:
    """(beyond float32, underflowing float32) tests over (entry point, argument, 0 is invalid) triples."""
    ids = [f"{f}-{a}" for f, a, _ in float_scalars]

    @pytest.mark.parametrize("fn,arg,positive", float_scalars, ids=ids)
    @pytest.mark.parametrize("value", [1e39, -1e39, 3.5e38])
    def test_float_scalars_beyond_float32_are_rejected(fn: str, arg: str, positive: bool, value: float) -> None:
        """1e39 is a finite double but Inf in float32: before the fix omega = 1e39 ran and produced Inf/NaN."""
        kwargs = valid_kwargs(fn)
        kwargs[arg] = value
        with pytest.raises(ValueError, match=rf"^{arg} must "):
            getattr(_core, fn)(**kwargs)

    @pytest.mark.parametrize("fn,arg,positive", float_scalars, ids=ids)
    def test_float_scalars_underflowing_float32(fn: str, arg: str, positive: bool) -> None:
        """1e-50 becomes 0 in float32: rejected where 0 is invalid (sigma_data = 1e-50 gave Inf), else accepted."""
        kwargs = valid_kwargs(fn)
        kwargs[arg] = 1e-50
        if positive:
            with pytest.raises(ValueError, match=rf"^{arg} must be representable in float32"):
                getattr(_core, fn)(**kwargs)
        else:
            getattr(_core, fn)(**kwargs)

    return test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32
