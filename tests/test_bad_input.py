"""Bad input to every diffinstruct._core entry point (and a few kernels.* wrappers).

Every case must raise a plain Python exception whose message names the offending
argument; none may crash, and none may be silently accepted. Each case starts
from a valid call (see `valid_kwargs`, checked by test_valid_baseline) and
changes one thing.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from diffinstruct import _core
from diffinstruct import kernels as K

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


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


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

CASES = [
    # ---- fill_uniform / fill_normal
    case(
        "fill-out-float64",
        "fill_uniform",
        TE,
        r"^out: expected dtype float32, float16, bfloat16, got (numpy\.)?float64",
        lambda kw: {"out": np.zeros((B, N))},
    ),
    case(
        "fill-out-int32-numpy",
        "fill_uniform",
        TE,
        r"^out: expected dtype .* got (numpy\.)?int32",
        lambda kw: {"out": np.zeros((B, N), np.int32)},
    ),
    case(
        "fill-out-bool-numpy",
        "fill_normal",
        TE,
        r"^out: expected dtype .* got (numpy\.)?bool_?",
        lambda kw: {"out": np.zeros((B, N), bool)},
    ),
    case(
        "fill-out-int32-torch",
        "fill_normal",
        TE,
        r"^out: expected dtype .*DLPack code 0 bits 32",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.int32)},
    ),
    case(
        "fill-out-bool-torch",
        "fill_uniform",
        TE,
        r"^out: expected dtype",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.bool)},
    ),
    case(
        "fill-out-float64-torch",
        "fill_uniform",
        TE,
        r"^out: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.float64)},
    ),
    case(
        "fill-out-transposed-torch",
        "fill_normal",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": transposed(B, N)},
    ),
    case(
        "fill-out-expanded-torch",
        "fill_normal",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": torch.zeros(1, N).expand(B, N)},
    ),
    case(
        "fill-out-numpy-step",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": step_slice(B, N)},
    ),
    case(
        "fill-out-negative-stride",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": empty(B, N)[::-1]},
    ),
    case("fill-out-zero-size-numpy", "fill_uniform", VE, r"^out: is empty", lambda kw: {"out": empty(0, N)}),
    case("fill-out-zero-size-torch", "fill_normal", VE, r"^out: is empty", lambda kw: {"out": torch.zeros(B, 0)}),
    case(
        "fill-out-read-only",
        "fill_uniform",
        VE,
        r"^out: output array is read-only",
        lambda kw: {"out": read_only(empty(B, N))},
    ),
    case(
        "fill-out-byteswapped",
        "fill_uniform",
        TE,
        r"^out: expected native byte order",
        lambda kw: {"out": np.zeros((B, N), ">f4")},
    ),
    case("fill-out-None", "fill_uniform", TE, r"^out: a tensor is required, got None", lambda kw: {"out": None}),
    case(
        "fill-out-list",
        "fill_uniform",
        TE,
        r"^out: expected a NumPy array, a DLPack capsule or an object with __dlpack__",
        lambda kw: {"out": [[0.0] * N] * B},
    ),
    case(
        "fill-out-plain-object",
        "fill_normal",
        TE,
        r"^out: expected a NumPy array.* got NotTensor",
        lambda kw: {"out": NotTensor()},
    ),
    case("fill-seed-negative", "fill_uniform", VE, r"^seed must be in \[0, 2\*\*64\), got -1", lambda kw: {"seed": -1}),
    case("fill-seed-2**64", "fill_uniform", VE, r"^seed must be in \[0, 2\*\*64\)", lambda kw: {"seed": 2**64}),
    case("fill-seed-float", "fill_normal", TE, r"^seed must be an int, got float", lambda kw: {"seed": 1.0}),
    case("fill-seed-str", "fill_normal", TE, r"^seed must be an int, got str", lambda kw: {"seed": "1"}),
    case("fill-seed-bool", "fill_uniform", TE, r"^seed must be an int, got bool", lambda kw: {"seed": True}),
    case("fill-seed-numpy-float", "fill_uniform", TE, r"^seed must be an int", lambda kw: {"seed": np.float64(3)}),
    case("fill-offset-negative", "fill_normal", VE, r"^offset must be in \[0, 2\*\*64\)", lambda kw: {"offset": -5}),
    case("fill-offset-huge", "fill_uniform", VE, r"^offset must be in \[0, 2\*\*64\)", lambda kw: {"offset": 2**80}),
    case("fill-offset-None", "fill_uniform", TE, r"^offset must be an int, got NoneType", lambda kw: {"offset": None}),
    # ---- sample_sigma
    case(
        "sample-sigma_out-float64",
        "sample_sigma",
        TE,
        r"^sigma_out: expected dtype float32, got (numpy\.)?float64",
        lambda kw: {"sigma_out": np.zeros(B)},
    ),
    case(
        "sample-sigma_out-2d", "sample_sigma", VE, r"^sigma_out: expected shape", lambda kw: {"sigma_out": empty(B, 1)}
    ),
    case(
        "sample-sigma_min-zero",
        "sample_sigma",
        VE,
        r"^sigma_min must be a finite number > 0, got 0",
        lambda kw: {"sigma_min": 0.0},
    ),
    case(
        "sample-sigma_min-negative",
        "sample_sigma",
        VE,
        r"^sigma_min must be a finite number > 0",
        lambda kw: {"sigma_min": -1.0},
    ),
    case(
        "sample-sigma_max-nan",
        "sample_sigma",
        VE,
        r"^sigma_max must be a finite number > 0, got nan",
        lambda kw: {"sigma_max": float("nan")},
    ),
    case(
        "sample-sigma_max-inf",
        "sample_sigma",
        VE,
        r"^sigma_max must be a finite number > 0, got inf",
        lambda kw: {"sigma_max": float("inf")},
    ),
    case(
        "sample-sigma_max-below-min",
        "sample_sigma",
        VE,
        r"^sigma_max \(0\.001\) must be >= sigma_min",
        lambda kw: {"sigma_max": 0.001},
    ),
    case("sample-p_mean-nan", "sample_sigma", VE, r"^p_mean must be finite", lambda kw: {"p_mean": float("nan")}),
    case("sample-p_std-negative", "sample_sigma", VE, r"^p_std must be in \[0, ", lambda kw: {"p_std": -0.5}),
    case("sample-p_std-inf", "sample_sigma", VE, r"^p_std must be in", lambda kw: {"p_std": float("inf")}),
    case(
        "sample-table-unsorted",
        "sample_sigma",
        VE,
        r"^table must be strictly ascending, but table\[2\]",
        lambda kw: {"table": vec(0.1, 0.5, 0.3, 2.0)},
    ),
    case(
        "sample-table-repeated",
        "sample_sigma",
        VE,
        r"^table must be strictly ascending",
        lambda kw: {"table": vec(0.1, 0.5, 0.5, 2.0)},
    ),
    case(
        "sample-table-nan",
        "sample_sigma",
        VE,
        r"^table\[1\] must be finite and >= 0, got nan",
        lambda kw: {"table": vec(0.1, float("nan"), 2.0)},
    ),
    case(
        "sample-table-inf",
        "sample_sigma",
        VE,
        r"^table\[2\] must be finite",
        lambda kw: {"table": vec(0.1, 1.0, np.inf)},
    ),
    case(
        "sample-table-negative",
        "sample_sigma",
        VE,
        r"^table\[0\] must be finite and >= 0",
        lambda kw: {"table": vec(-1.0, 1.0)},
    ),
    case(
        "sample-table-float64",
        "sample_sigma",
        TE,
        r"^table: expected dtype float32, got (numpy\.)?float64",
        lambda kw: {"table": np.linspace(0.1, 1, 4)},
    ),
    case("sample-table-2d", "sample_sigma", VE, r"^table: expected a non-empty 1-D", lambda kw: {"table": empty(2, 2)}),
    case(
        "sample-index_out-int32",
        "sample_sigma",
        TE,
        r"^index_out: expected dtype int64, got (numpy\.)?int32",
        lambda kw: {"index_out": empty(B, dtype=np.int32)},
    ),
    case(
        "sample-index_out-float32",
        "sample_sigma",
        TE,
        r"^index_out: expected dtype int64, got (numpy\.)?float32",
        lambda kw: {"index_out": empty(B)},
    ),
    case(
        "sample-index_out-length",
        "sample_sigma",
        VE,
        r"^index_out: expected shape \(2,\)",
        lambda kw: {"index_out": empty(B + 1, dtype=np.int64)},
    ),
    case(
        "sample-snap-without-table",
        "sample_sigma",
        VE,
        r"snap=True needs a sigma table",
        lambda kw: {"table": None, "index_out": None},
    ),
    case(
        "sample-index_out-without-table",
        "sample_sigma",
        VE,
        r"^index_out needs a sigma table",
        lambda kw: {"table": None, "snap": False},
    ),
    case("sample-seed-huge", "sample_sigma", VE, r"^seed must be in", lambda kw: {"seed": 2**64 + 1}),
    case("sample-offset-float", "sample_sigma", TE, r"^offset must be an int", lambda kw: {"offset": 0.0}),
    case(
        "sample-sigma_out-aliases-table",
        "sample_sigma",
        VE,
        r"^sigma_out overlaps table",
        lambda kw: (lambda s: {"sigma_out": s, "table": s})(vec(0.1, 0.2)),
    ),
    case(
        "sample-index_out-overlaps-sigma_out",
        "sample_sigma",
        VE,
        r"overlaps",
        lambda kw: (lambda buf: {"sigma_out": buf[1:3], "index_out": buf.view(np.int64)[:2]})(empty(8)),
    ),
    # ---- sigma_table
    case(
        "table-kind-unknown",
        "sigma_table",
        VE,
        r"^kind must be one of iddpm_linear, scaled_linear, got 'cosine'",
        lambda kw: {"kind": "cosine"},
    ),
    case("table-steps-1", "sigma_table", VE, r"^steps must be in \[2, 100000000\], got 1", lambda kw: {"steps": 1}),
    case("table-steps-negative", "sigma_table", VE, r"^steps must be in", lambda kw: {"steps": -10}),
    case(
        "table-beta_start-zero", "sigma_table", VE, r"^beta_start must be in \(0, 1\)", lambda kw: {"beta_start": 0.0}
    ),
    case(
        "table-beta_start-negative",
        "sigma_table",
        VE,
        r"^beta_start must be in \(0, 1\), got -0.5",
        lambda kw: {"beta_start": -0.5},
    ),
    case(
        "table-beta_start-str",
        "sigma_table",
        TE,
        r"^beta_start must be a real number, got str",
        lambda kw: {"beta_start": "0.1"},
    ),
    case("table-beta_end-one", "sigma_table", VE, r"^beta_end must be in \(0, 1\)", lambda kw: {"beta_end": 1.0}),
    case("table-beta_end-nan", "sigma_table", VE, r"^beta_end must be in", lambda kw: {"beta_end": float("nan")}),
    case("table-clip-zero", "sigma_table", VE, r"^clip must be in \(0, 1\]", lambda kw: {"clip": 0.0}),
    # ---- precond
    case(
        "precond-sigma-zero",
        "precond",
        VE,
        r"^sigma\[0\] must be finite and > 0, got 0",
        lambda kw: {"sigma": vec(0.0, 1.0)},
    ),
    case(
        "precond-sigma-nan",
        "precond",
        VE,
        r"^sigma\[1\] must be finite and > 0, got nan",
        lambda kw: {"sigma": vec(1.0, np.nan)},
    ),
    case(
        "precond-sigma-neg-inf", "precond", VE, r"^sigma\[0\] must be finite", lambda kw: {"sigma": vec(-np.inf, 1.0)}
    ),
    case(
        "precond-kind-unknown", "precond", VE, r"^kind must be one of edm, eps, v, got 'x0'", lambda kw: {"kind": "x0"}
    ),
    case(
        "precond-sigma_data-zero",
        "precond",
        VE,
        r"^sigma_data must be a finite number > 0",
        lambda kw: {"sigma_data": 0.0},
    ),
    case("precond-c_out-length", "precond", VE, r"^c_out: expected shape \(2,\)", lambda kw: {"c_out": empty(3)}),
    case("precond-c_in-float64", "precond", TE, r"^c_in: expected dtype float32", lambda kw: {"c_in": np.zeros(B)}),
    case("precond-weight-aliases-sigma", "precond", VE, r"^weight overlaps sigma", lambda kw: {"weight": kw["sigma"]}),
    case(
        "precond-c_skip-read-only",
        "precond",
        VE,
        r"^c_skip: output array is read-only",
        lambda kw: {"c_skip": read_only(empty(B))},
    ),
    case(
        "precond-c_noise-is-c_in",
        "precond",
        VE,
        r"(c_noise overlaps c_in|c_in overlaps c_noise)",
        lambda kw: {"c_noise": kw["c_in"]},
    ),
    # ---- add_noise
    case(
        "noise-x0-float64",
        "add_noise",
        TE,
        r"^x0: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"x0": np.zeros((B, N))},
    ),
    case(
        "noise-x0-int32-torch",
        "add_noise",
        TE,
        r"^x0: expected dtype",
        lambda kw: {"x0": torch.zeros(B, N, dtype=torch.int32)},
    ),
    case("noise-x0-scalar", "add_noise", VE, r"^x0: expected a batch", lambda kw: {"x0": np.ones((), np.float32)}),
    case("noise-x0-zero-size", "add_noise", VE, r"^x0: is empty", lambda kw: {"x0": empty(B, 0)}),
    case(
        "noise-xt_out-shape",
        "add_noise",
        VE,
        r"^xt_out has shape \(2, 5\) but x0 has shape \(2, 6\)",
        lambda kw: {"xt_out": empty(B, N - 1)},
    ),
    case(
        "noise-xt_out-dtype",
        "add_noise",
        TE,
        r"^xt_out is float16 but x0 is float32",
        lambda kw: {"xt_out": empty(B, N, dtype=np.float16)},
    ),
    case(
        "noise-sigma-length",
        "add_noise",
        VE,
        r"^sigma: expected shape \(2,\) \(one value per sample of x0\), got \(3,\)",
        lambda kw: {"sigma": vec(1, 1, 1)},
    ),
    case(
        "noise-sigma-float64",
        "add_noise",
        TE,
        r"^sigma: expected dtype float32, got (numpy\.)?float64",
        lambda kw: {"sigma": np.ones(B)},
    ),
    case(
        "noise-sigma-zero",
        "add_noise",
        VE,
        r"^sigma\[1\] must be finite and > 0, got 0",
        lambda kw: {"sigma": vec(1, 0)},
    ),
    case(
        "noise-sigma-negative",
        "add_noise",
        VE,
        r"^sigma\[0\] must be finite and > 0, got -1",
        lambda kw: {"sigma": vec(-1, 1)},
    ),
    case(
        "noise-sigma-nan",
        "add_noise",
        VE,
        r"^sigma\[0\] must be finite and > 0, got nan",
        lambda kw: {"sigma": vec(np.nan, 1)},
    ),
    case(
        "noise-sigma-inf",
        "add_noise",
        VE,
        r"^sigma\[1\] must be finite and > 0, got inf",
        lambda kw: {"sigma": vec(1, np.inf)},
    ),
    case(
        "noise-sigma-negative-stride",
        "add_noise",
        VE,
        r"^sigma: expected a C-contiguous",
        lambda kw: {"sigma": vec(1, 2)[::-1]},
    ),
    case("noise-xt_out-is-x0", "add_noise", VE, r"^xt_out overlaps x0", lambda kw: {"xt_out": kw["x0"]}),
    case(
        "noise-eps_out-is-xt_out",
        "add_noise",
        VE,
        r"(eps_out overlaps xt_out|xt_out overlaps eps_out)",
        lambda kw: {"eps_out": kw["xt_out"]},
    ),
    case(
        "noise-xt_out-partial-overlap-x0",
        "add_noise",
        VE,
        r"^xt_out overlaps x0",
        lambda kw: dict(zip(("x0", "xt_out"), overlapping_pair((B, N), N + 1), strict=True)),
    ),
    case(
        "noise-xt_out-overlaps-sigma",
        "add_noise",
        VE,
        r"^xt_out overlaps sigma",
        lambda kw: sigma_and_output_sharing_memory(),
    ),
    case(
        "noise-xt_out-transposed",
        "add_noise",
        VE,
        r"^xt_out: expected a C-contiguous",
        lambda kw: {"x0": torch.ones(B, N), "xt_out": transposed(B, N), "eps_out": None},
    ),
    case(
        "noise-eps_out-read-only",
        "add_noise",
        VE,
        r"^eps_out: output array is read-only",
        lambda kw: {"eps_out": read_only(empty(B, N))},
    ),
    case("noise-seed-2**64", "add_noise", VE, r"^seed must be in \[0, 2\*\*64\)", lambda kw: {"seed": 2**64}),
    case("noise-seed-None", "add_noise", TE, r"^seed must be an int, got NoneType", lambda kw: {"seed": None}),
    # ---- cfg_combine
    case("cfg-omega-nan", "cfg_combine", VE, r"^omega must be finite, got nan", lambda kw: {"omega": float("nan")}),
    case("cfg-omega-inf", "cfg_combine", VE, r"^omega must be finite, got -inf", lambda kw: {"omega": -float("inf")}),
    case(
        "cfg-cond-shape",
        "cfg_combine",
        VE,
        r"^cond has shape \(6, 2\) but uncond has shape \(2, 6\)",
        lambda kw: {"cond": f32(N, B)},
    ),
    case(
        "cfg-cond-dtype",
        "cfg_combine",
        TE,
        r"^cond is bfloat16 but uncond is float32",
        lambda kw: {"cond": torch.ones(B, N, dtype=torch.bfloat16)},
    ),
    case("cfg-out-is-cond", "cfg_combine", VE, r"^out overlaps cond", lambda kw: {"out": kw["cond"]}),
    case(
        "cfg-uncond-bool", "cfg_combine", TE, r"^uncond: expected dtype", lambda kw: {"uncond": np.ones((B, N), bool)}
    ),
    case("cfg-uncond-zero-size", "cfg_combine", VE, r"^uncond: is empty", lambda kw: {"uncond": empty(0)}),
    case(
        "cfg-out-negative-stride",
        "cfg_combine",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": empty(B, N)[:, ::-1]},
    ),
    case("cfg-cond-dict", "cfg_combine", TE, r"^cond: expected a NumPy array.* got dict", lambda kw: {"cond": {}}),
    # ---- ta_loss
    case(
        "ta-weighting-unknown",
        "ta_loss",
        VE,
        r"^weighting must be one of unit, edm, got 'snr'",
        lambda kw: {"weighting": "snr"},
    ),
    case(
        "ta-reduction-unknown",
        "ta_loss",
        VE,
        r"^reduction must be one of sum, mean, got 'none'",
        lambda kw: {"reduction": "none"},
    ),
    case(
        "ta-sigma_data-zero", "ta_loss", VE, r"^sigma_data must be a finite number > 0", lambda kw: {"sigma_data": 0.0}
    ),
    case(
        "ta-sigma_data-nan",
        "ta_loss",
        VE,
        r"^sigma_data must be a finite number > 0, got nan",
        lambda kw: {"sigma_data": float("nan")},
    ),
    case("ta-sigma-missing-edm", "ta_loss", VE, r"^sigma is required with weighting='edm'", lambda kw: {"sigma": None}),
    case("ta-sigma-zero", "ta_loss", VE, r"^sigma\[0\] must be finite and > 0", lambda kw: {"sigma": vec(0, 1)}),
    case(
        "ta-sigma-inf",
        "ta_loss",
        VE,
        r"^sigma\[1\] must be finite and > 0, got inf",
        lambda kw: {"sigma": vec(1, np.inf)},
    ),
    case("ta-loss_out-length", "ta_loss", VE, r"^loss_out: expected shape \(2,\)", lambda kw: {"loss_out": empty(1)}),
    case(
        "ta-loss_out-float16",
        "ta_loss",
        TE,
        r"^loss_out: expected dtype float32, got (numpy\.)?float16",
        lambda kw: {"loss_out": empty(B, dtype=np.float16)},
    ),
    case(
        "ta-loss_out-read-only",
        "ta_loss",
        VE,
        r"^loss_out: output array is read-only",
        lambda kw: {"loss_out": read_only(empty(B))},
    ),
    case(
        "ta-nonfinite_out-int32",
        "ta_loss",
        TE,
        r"^nonfinite_out: expected dtype int64, got (numpy\.)?int32",
        lambda kw: {"nonfinite_out": empty(B, dtype=np.int32)},
    ),
    case(
        "ta-nonfinite_out-float32",
        "ta_loss",
        TE,
        r"^nonfinite_out: expected dtype int64",
        lambda kw: {"nonfinite_out": empty(B)},
    ),
    case("ta-grad_out-is-d_ta", "ta_loss", VE, r"^grad_out overlaps d_ta", lambda kw: {"grad_out": kw["d_ta"]}),
    case("ta-grad_out-shape", "ta_loss", VE, r"^grad_out has shape", lambda kw: {"grad_out": empty(B, N, 1)}),
    case(
        "ta-x0-shape",
        "ta_loss",
        VE,
        r"^x0 has shape \(3, 6\) but d_ta has shape \(2, 6\)",
        lambda kw: {"x0": f32(3, N)},
    ),
    case(
        "ta-d_ta-transposed",
        "ta_loss",
        VE,
        r"^d_ta: expected a C-contiguous",
        lambda kw: {"d_ta": transposed(B, N), "x0": torch.zeros(B, N), "grad_out": None},
    ),
    case(
        "ta-d_ta-requires-grad-raw-core",
        "ta_loss",
        BE,
        r"^d_ta: __dlpack__\(\) failed .*detach",
        lambda kw: {"d_ta": torch.zeros(B, N, requires_grad=True), "x0": torch.zeros(B, N)},
    ),
    # ---- generator_grad
    case("gen-omega-nan", "generator_grad", VE, r"^omega must be finite, got nan", lambda kw: {"omega": float("nan")}),
    case("gen-alpha-inf", "generator_grad", VE, r"^alpha must be finite, got inf", lambda kw: {"alpha": float("inf")}),
    case("gen-alpha-nan", "generator_grad", VE, r"^alpha must be finite", lambda kw: {"alpha": float("nan")}),
    case(
        "gen-min_norm-zero",
        "generator_grad",
        VE,
        r"^min_norm must be a finite number > 0",
        lambda kw: {"min_norm": 0.0},
    ),
    case(
        "gen-weighting-unknown",
        "generator_grad",
        VE,
        r"^weighting must be one of unit, normalized, got 'edm'",
        lambda kw: {"weighting": "edm"},
    ),
    case(
        "gen-weight_out-length",
        "generator_grad",
        VE,
        r"^weight_out: expected shape \(2,\)",
        lambda kw: {"weight_out": empty(B + 2)},
    ),
    case(
        "gen-gap_out-float64",
        "generator_grad",
        TE,
        r"^gap_out: expected dtype float32",
        lambda kw: {"gap_out": np.zeros(B)},
    ),
    case(
        "gen-nonfinite_out-float",
        "generator_grad",
        TE,
        r"^nonfinite_out: expected dtype int64",
        lambda kw: {"nonfinite_out": empty(B)},
    ),
    case("gen-d_uncond-shape", "generator_grad", VE, r"^d_uncond has shape", lambda kw: {"d_uncond": f32(B, N + 1)}),
    case(
        "gen-dr-dtype",
        "generator_grad",
        TE,
        r"^dr is float16 but x0 is float32",
        lambda kw: {"dr": empty(B, N, dtype=np.float16)},
    ),
    case(
        "gen-grad_out-is-d_cond",
        "generator_grad",
        VE,
        r"^grad_out overlaps d_cond",
        lambda kw: {"grad_out": kw["d_cond"]},
    ),
    case(
        "gen-surrogate_out-is-gap_out",
        "generator_grad",
        VE,
        r"(surrogate_out overlaps gap_out|gap_out overlaps surrogate_out)",
        lambda kw: {"surrogate_out": kw["gap_out"]},
    ),
    case(
        "gen-grad_out-partial-overlap-dr",
        "generator_grad",
        VE,
        r"^grad_out overlaps dr",
        lambda kw: dict(zip(("dr", "grad_out"), overlapping_pair((B, N), 3), strict=True)),
    ),
    case(
        "gen-d_ta-bool-torch",
        "generator_grad",
        TE,
        r"^d_ta: expected dtype",
        lambda kw: {"d_ta": torch.ones(B, N, dtype=torch.bool)},
    ),
    case(
        "gen-x0-float64",
        "generator_grad",
        TE,
        r"^x0: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"x0": np.zeros((B, N))},
    ),
    case(
        "gen-grad_out-step-slice",
        "generator_grad",
        VE,
        r"^grad_out: expected a C-contiguous",
        lambda kw: {"grad_out": step_slice(B, N)},
    ),
    case(
        "gen-d_cond-missing",
        "generator_grad",
        TE,
        r"^d_cond: a tensor is required, got None",
        lambda kw: {"d_cond": None},
    ),
    # ---- huber_terms
    case("huber-c-zero", "huber_terms", VE, r"^c must be a finite number > 0, got 0", lambda kw: {"c": 0.0}),
    case("huber-c-negative", "huber_terms", VE, r"^c must be a finite number > 0, got -0.1", lambda kw: {"c": -0.1}),
    case("huber-c-nan", "huber_terms", VE, r"^c must be a finite number > 0, got nan", lambda kw: {"c": float("nan")}),
    case("huber-c-inf", "huber_terms", VE, r"^c must be a finite number > 0, got inf", lambda kw: {"c": float("inf")}),
    case(
        "huber-weighting-unknown",
        "huber_terms",
        VE,
        r"^weighting must be one of unit, sigma2, got 'sigma'",
        lambda kw: {"weighting": "sigma"},
    ),
    case("huber-sigma-zero", "huber_terms", VE, r"^sigma\[0\] must be finite and > 0", lambda kw: {"sigma": vec(0, 1)}),
    case(
        "huber-sigma-nan",
        "huber_terms",
        VE,
        r"^sigma\[1\] must be finite and > 0, got nan",
        lambda kw: {"sigma": vec(1, np.nan)},
    ),
    case(
        "huber-a_out-is-b_out",
        "huber_terms",
        VE,
        r"(a_out overlaps b_out|b_out overlaps a_out)",
        lambda kw: {"a_out": kw["b_out"]},
    ),
    case("huber-h_out-length", "huber_terms", VE, r"^h_out: expected shape \(2,\)", lambda kw: {"h_out": empty(1)}),
    case(
        "huber-value_out-float64",
        "huber_terms",
        TE,
        r"^value_out: expected dtype float32",
        lambda kw: {"value_out": np.zeros(B)},
    ),
    case(
        "huber-nonfinite_out-int32",
        "huber_terms",
        TE,
        r"^nonfinite_out: expected dtype int64",
        lambda kw: {"nonfinite_out": empty(B, dtype=np.int32)},
    ),
    case("huber-d_q-shape", "huber_terms", VE, r"^d_q has shape", lambda kw: {"d_q": f32(B, N, 1)}),
    case(
        "huber-d_p-dtype",
        "huber_terms",
        TE,
        r"^d_p is float16 but x0 is float32",
        lambda kw: {"d_p": empty(B, N, dtype=np.float16)},
    ),
    case(
        "huber-dprime_out-overlaps-x0",
        "huber_terms",
        VE,
        r"^dprime_out overlaps x0",
        lambda kw: dict(zip(("x0", "dprime_out"), overlapping_pair((B, N), 1), strict=True)),
    ),
    # ---- ema_update
    case("ema-decay-above-1", "ema_update", VE, r"^decay must be in \[0, 1\], got 1.5", lambda kw: {"decay": 1.5}),
    case("ema-decay-negative", "ema_update", VE, r"^decay must be in \[0, 1\]", lambda kw: {"decay": -0.1}),
    case("ema-decay-nan", "ema_update", VE, r"^decay must be in \[0, 1\], got nan", lambda kw: {"decay": float("nan")}),
    case(
        "ema-ema-not-list",
        "ema_update",
        TE,
        r"^ema must be a list or tuple of tensors, got numpy.ndarray",
        lambda kw: {"ema": f32(2, 3)},
    ),
    case(
        "ema-params-not-list",
        "ema_update",
        TE,
        r"^params must be a list or tuple of tensors, got dict",
        lambda kw: {"params": {}},
    ),
    case(
        "ema-empty-lists", "ema_update", VE, r"^ema: the list of tensors is empty", lambda kw: {"ema": [], "params": []}
    ),
    case(
        "ema-length-mismatch",
        "ema_update",
        VE,
        r"^params has 1 tensors but ema has 2",
        lambda kw: {"params": kw["params"][:1]},
    ),
    case(
        "ema-item-float64",
        "ema_update",
        TE,
        r"^ema\[1\]: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"ema": [kw["ema"][0], np.zeros(5)]},
    ),
    case(
        "ema-item-shape",
        "ema_update",
        VE,
        r"^params\[0\] has shape \(3, 2\) but ema\[0\] has shape \(2, 3\)",
        lambda kw: {"params": [f32(3, 2), kw["params"][1]]},
    ),
    case(
        "ema-item-is-param",
        "ema_update",
        VE,
        r"^ema\[0\] overlaps params\[0\]",
        lambda kw: {"params": [kw["ema"][0], kw["params"][1]]},
    ),
    case(
        "ema-item-read-only",
        "ema_update",
        VE,
        r"^ema\[0\]: output array is read-only",
        lambda kw: {"ema": [read_only(f32(2, 3)), kw["ema"][1]]},
    ),
    case(
        "ema-item-twice",
        "ema_update",
        VE,
        r"ema\[1\] overlaps ema\[0\]|ema\[0\] overlaps ema\[1\]",
        lambda kw: (lambda e: {"ema": [e, e], "params": [f32(5), f32(5)]})(f32(5)),
    ),
    case(
        "ema-item-string",
        "ema_update",
        TE,
        r"^ema\[0\]: expected a NumPy array.* got str",
        lambda kw: {"ema": ["w", kw["ema"][1]]},
    ),
    case(
        "ema-item-zero-size",
        "ema_update",
        VE,
        r"^ema\[1\]: is empty",
        lambda kw: {"ema": [kw["ema"][0], empty(0)], "params": [kw["params"][0], empty(0)]},
    ),
    # ---- adam_step
    case("adam-beta1-one", "adam_step", VE, r"^beta1 must be in \[0, 1\), got 1", lambda kw: {"beta1": 1.0}),
    case("adam-beta1-negative", "adam_step", VE, r"^beta1 must be in \[0, 1\)", lambda kw: {"beta1": -0.1}),
    case("adam-beta2-one", "adam_step", VE, r"^beta2 must be in \[0, 1\), got 1", lambda kw: {"beta2": 1.0}),
    case("adam-beta2-nan", "adam_step", VE, r"^beta2 must be in", lambda kw: {"beta2": float("nan")}),
    case("adam-eps-zero", "adam_step", VE, r"^eps must be a finite number > 0, got 0", lambda kw: {"eps": 0.0}),
    case("adam-eps-negative", "adam_step", VE, r"^eps must be a finite number > 0", lambda kw: {"eps": -1e-8}),
    case("adam-lr-negative", "adam_step", VE, r"^lr must be in \[0, 1e\+06\], got -0.1", lambda kw: {"lr": -0.1}),
    case("adam-lr-nan", "adam_step", VE, r"^lr must be in", lambda kw: {"lr": float("nan")}),
    case("adam-weight_decay-negative", "adam_step", VE, r"^weight_decay must be in", lambda kw: {"weight_decay": -1.0}),
    case("adam-step-zero", "adam_step", VE, r"^step must be >= 1, got 0", lambda kw: {"step": 0}),
    case("adam-step-negative", "adam_step", VE, r"^step must be >= 1", lambda kw: {"step": -3}),
    case(
        "adam-grads-length",
        "adam_step",
        VE,
        r"^grads has 1 tensors but params has 2",
        lambda kw: {"grads": kw["grads"][:1]},
    ),
    case(
        "adam-exp_avg_sqs-length",
        "adam_step",
        VE,
        r"^exp_avg_sqs has 3 tensors but params has 2",
        lambda kw: {"exp_avg_sqs": [*kw["exp_avg_sqs"], empty(1)]},
    ),
    case(
        "adam-empty-lists",
        "adam_step",
        VE,
        r"^params: the list of tensors is empty",
        lambda kw: {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": []},
    ),
    case(
        "adam-params-not-list",
        "adam_step",
        TE,
        r"^params must be a list or tuple of tensors, got numpy.ndarray",
        lambda kw: {"params": f32(5)},
    ),
    case(
        "adam-grads-generator",
        "adam_step",
        TE,
        r"^grads must be a list or tuple of tensors, got generator",
        lambda kw: {"grads": (g for g in kw["grads"])},
    ),
    case(
        "adam-exp_avgs-float16",
        "adam_step",
        TE,
        r"^exp_avgs\[0\]: expected dtype float32, got (numpy\.)?float16",
        lambda kw: {"exp_avgs": [empty(2, 3, dtype=np.float16), kw["exp_avgs"][1]]},
    ),
    case(
        "adam-exp_avg_sqs-shape",
        "adam_step",
        VE,
        r"^exp_avg_sqs\[1\] has shape \(4,\) but params\[1\] has shape \(5,\)",
        lambda kw: {"exp_avg_sqs": [kw["exp_avg_sqs"][0], empty(4)]},
    ),
    case(
        "adam-grad-is-param",
        "adam_step",
        VE,
        r"^params\[0\] overlaps grads\[0\]",
        lambda kw: {"grads": [kw["params"][0], kw["grads"][1]]},
    ),
    case(
        "adam-exp_avg-is-exp_avg_sq",
        "adam_step",
        VE,
        r"exp_avg_sqs\[0\] overlaps exp_avgs\[0\]|exp_avgs\[0\] overlaps exp_avg_sqs\[0\]",
        lambda kw: {"exp_avg_sqs": [kw["exp_avgs"][0], kw["exp_avg_sqs"][1]]},
    ),
    case(
        "adam-exp_avgs-none-with-momentum",
        "adam_step",
        VE,
        r"^exp_avgs may be None only when beta1 == 0 \(got beta1 = 0.9\)",
        lambda kw: {"exp_avgs": None},
    ),
    case(
        "adam-exp_avgs-none-bad-exp_avg_sqs-shape",
        "adam_step",
        VE,
        r"^exp_avg_sqs\[1\] has shape \(4,\) but params\[1\] has shape \(5,\)",
        lambda kw: {"exp_avgs": None, "beta1": 0.0, "exp_avg_sqs": [kw["exp_avg_sqs"][0], empty(4)]},
    ),
    case(
        "adam-grads-int32",
        "adam_step",
        TE,
        r"^grads\[1\]: expected dtype .* got (numpy\.)?int32",
        lambda kw: {"grads": [kw["grads"][0], np.zeros(5, np.int32)]},
    ),
    case(
        "adam-params-transposed-torch",
        "adam_step",
        VE,
        r"^params\[0\]: expected a C-contiguous",
        lambda kw: {"params": [transposed(2, 3), kw["params"][1]]},
    ),
    case(
        "adam-params-item-None",
        "adam_step",
        TE,
        r"^params\[1\]: a tensor is required, got None",
        lambda kw: {"params": [kw["params"][0], None]},
    ),
    # ---- stream_copy / stream_triad
    case(
        "copy-b-float64",
        "stream_copy",
        TE,
        r"^b: expected dtype float32, got (numpy\.)?float64",
        lambda kw: {"b": np.zeros(16)},
    ),
    case(
        "copy-a-float16",
        "stream_copy",
        TE,
        r"^a: expected dtype float32, got (numpy\.)?float16",
        lambda kw: {"a": empty(16, dtype=np.float16)},
    ),
    case("copy-a-is-b", "stream_copy", VE, r"^a overlaps b", lambda kw: {"a": kw["b"]}),
    case("copy-shape", "stream_copy", VE, r"^b has shape \(8,\) but a has shape \(16,\)", lambda kw: {"b": f32(8)}),
    case("triad-c-None", "stream_triad", TE, r"^c: a tensor is required, got None", lambda kw: {"c": None}),
    case(
        "triad-c-shape",
        "stream_triad",
        VE,
        r"^c has shape \(4, 4\) but a has shape \(16,\)",
        lambda kw: {"c": f32(4, 4)},
    ),
    case(
        "triad-a-read-only",
        "stream_triad",
        VE,
        r"^a: output array is read-only",
        lambda kw: {"a": read_only(empty(16))},
    ),
    case(
        "triad-a-overlaps-c",
        "stream_triad",
        VE,
        r"^a overlaps c",
        lambda kw: dict(zip(("c", "a"), overlapping_pair((16,), 4), strict=True)),
    ),
    # ---- garbage DLPack producers (fed to fill_uniform's out or to ta_loss's x0)
    case(
        "dlpack-non-capsule",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": NonCapsuleProducer()},
    ),
    case(
        "dlpack-device-not-tuple",
        "fill_uniform",
        BE,
        r"^out: __dlpack_device__ did not return \(device_type, device_id\)",
        lambda kw: {"out": DeviceNotTuple()},
    ),
    case(
        "dlpack-device-wrong-arity",
        "fill_normal",
        BE,
        r"^out: __dlpack_device__ did not return",
        lambda kw: {"out": DeviceWrongArity()},
    ),
    case(
        "dlpack-device-not-ints",
        "fill_normal",
        BE,
        r"^out: __dlpack_device__ did not return",
        lambda kw: {"out": DeviceNotInts()},
    ),
    case(
        "dlpack-device-raises",
        "fill_uniform",
        BE,
        r"^out: __dlpack_device__\(\) failed \(KeyError",
        lambda kw: {"out": DeviceRaises()},
    ),
    case(
        "dlpack-device-missing",
        "ta_loss",
        TE,
        r"^x0: NoDeviceMethod has __dlpack__ but no __dlpack_device__",
        lambda kw: {"x0": NoDeviceMethod()},
    ),
    case(
        "dlpack-device-unsupported",
        "ta_loss",
        VE,
        r"^x0: unsupported device type 13",
        lambda kw: {"x0": DeviceUnsupported()},
    ),
    case(
        "dlpack-device-lies",
        "ta_loss",
        BE,
        r"^x0: (__dlpack__ returned a tensor on device|__dlpack__\(\) failed)",
        lambda kw: {"x0": DeviceLies()},
    ),
    case(
        "dlpack-producer-raises",
        "ta_loss",
        BE,
        r"^x0: __dlpack__\(\) failed \(RuntimeError: producer failure\)",
        lambda kw: {"x0": DlpackRaises()},
    ),
    case(
        "dlpack-not-callable",
        "fill_uniform",
        BE,
        r"^out: __dlpack__\(\) failed \(TypeError",
        lambda kw: {"out": DlpackNotCallable()},
    ),
    case(
        "dlpack-capsule-reused",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": ReusedCapsule()},
    ),
    case(
        "forged-capsule-name",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": Forged(name=b"not_a_tensor")},
    ),
    case(
        "forged-device-mismatch",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned a tensor on device \(2, 0\) but __dlpack_device__ said \(1, 0\)",
        lambda kw: {"out": Forged(capsule_device=(2, 0))},
    ),
    case(
        "forged-null-shape",
        "fill_uniform",
        BE,
        r"^out: DLPack tensor has 2 dimensions but no shape",
        lambda kw: {"out": Forged(null_shape=True)},
    ),
    case(
        "forged-null-data",
        "fill_uniform",
        BE,
        r"^out: DLPack tensor has a NULL data pointer",
        lambda kw: {"out": Forged(null_data=True)},
    ),
    case(
        "forged-major-version-2",
        "fill_uniform",
        BE,
        r"^out: DLPack major version 2 is not supported",
        lambda kw: {"out": Forged(major=2)},
    ),
    case(
        "forged-read-only-output",
        "fill_uniform",
        VE,
        r"^out: output tensor is read-only",
        lambda kw: {"out": Forged(flags=FLAG_READ_ONLY)},
    ),
    case(
        "forged-copied-output",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ exported a copy",
        lambda kw: {"out": Forged(flags=FLAG_IS_COPIED)},
    ),
    case(
        "forged-17-dims",
        "fill_uniform",
        VE,
        r"^out: at most 16 dimensions",
        lambda kw: {"out": Forged(shape=(1,) * 17)},
    ),
    case(
        "forged-negative-dim",
        "fill_uniform",
        VE,
        r"^out: negative dimension",
        lambda kw: {"out": Forged(shape=(2, -3))},
    ),
    case(
        "forged-element-count-overflow",
        "fill_uniform",
        VE,
        r"^out: too many elements",
        lambda kw: {"out": Forged(shape=(2**40, 2**40))},
    ),
    case(
        "forged-two-lanes",
        "fill_uniform",
        TE,
        r"^out: expected dtype .*lanes 2",
        lambda kw: {"out": Forged(dtype=(2, 32, 2))},
    ),
    case(
        "forged-uint8",
        "fill_uniform",
        TE,
        r"^out: expected dtype .*DLPack code 1 bits 8",
        lambda kw: {"out": Forged(dtype=(1, 8, 1))},
    ),
    case(
        "forged-unaligned",
        "fill_uniform",
        VE,
        r"^out: data pointer is not aligned",
        lambda kw: {"out": Forged(byte_offset=2)},
    ),
    case(
        "forged-strided",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": Forged(shape=(3,), strides=(2,))},
    ),
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("cfg-omega-str", "cfg_combine", TE, r"^omega must be a real number, got str", lambda kw: {"omega": "1.5"}),
    case("cfg-omega-none", "cfg_combine", TE, r"^omega must be a real number, got NoneType",
         lambda kw: {"omega": None}),
    case("cfg-omega-bool", "cfg_combine", TE, r"^omega must be a real number, got bool", lambda kw: {"omega": True}),
    case("cfg-omega-complex", "cfg_combine", TE, r"^omega must be a real number, got complex",
         lambda kw: {"omega": 1j}),
    case(
        "cfg-omega-numpy-complex",
        "cfg_combine",
        TE,
        r"^omega must be a real number, got numpy\.complex128",
        lambda kw: {"omega": np.complex128(2.0)},
    ),
    case(
        "cfg-omega-array",
        "cfg_combine",
        TE,
        r"^omega must be a real number, got numpy\.ndarray",
        lambda kw: {"omega": np.ones(3)},
    ),
    case(
        "cfg-omega-huge-int",
        "cfg_combine",
        VE,
        r"^omega must be a finite number, got an int too large for a float",
        lambda kw: {"omega": 10**400},
    ),
    case(
        "ta-weighting-none",
        "ta_loss",
        TE,
        r"^weighting must be a str \(one of unit, edm\), got NoneType",
        lambda kw: {"weighting": None},
    ),
    case("ta-reduction-int", "ta_loss", TE, r"^reduction must be a str .*got int", lambda kw: {"reduction": 1}),
    case(
        "ta-weighting-embedded-nul",
        "ta_loss",
        VE,
        r"^weighting must be one of unit, edm, got 'edm\\x00'",
        lambda kw: {"weighting": "edm\0"},
    ),
    case(
        "gen-weighting-surrogate",
        "generator_grad",
        VE,
        r"^weighting must be one of unit, normalized, got '\\ud800'",
        lambda kw: {"weighting": "\ud800"},
    ),
    case("table-kind-bytes", "sigma_table", TE, r"^kind must be a str .*got bytes",
         lambda kw: {"kind": b"iddpm_linear"}),
    case(
        "table-steps-huge",
        "sigma_table",
        VE,
        r"^steps must be in \[2, 100000000\], got an int >= 2\*\*63",
        lambda kw: {"steps": 10**30},
    ),
    case("table-steps-float", "sigma_table", TE, r"^steps must be an int, got float", lambda kw: {"steps": 16.0}),
    case("table-steps-bool", "sigma_table", TE, r"^steps must be an int, got bool", lambda kw: {"steps": True}),
    case(
        "table-beta-str", "sigma_table", TE, r"^beta_start must be a real number, got str",
        lambda kw: {"beta_start": "0.1"},
    ),
    case("precond-kind-none", "precond", TE, r"^kind must be a str", lambda kw: {"kind": None}),
    case("noise-flow-str", "add_noise", TE, r"^flow must be a bool, got str", lambda kw: {"flow": "False"}),
    case("noise-flow-two", "add_noise", VE, r"^flow must be True or False \(or 0 or 1\)", lambda kw: {"flow": 2}),
    case("noise-flow-none", "add_noise", TE, r"^flow must be a bool, got NoneType", lambda kw: {"flow": None}),
    case("sample-snap-list", "sample_sigma", TE, r"^snap must be a bool, got list", lambda kw: {"snap": [1]}),
    case("adam-decoupled-str", "adam_step", TE, r"^decoupled must be a bool", lambda kw: {"decoupled": "yes"}),
    case(
        "adam-step-huge",
        "adam_step",
        VE,
        r"^step must be in \[1, 2\*\*63\), got an int >= 2\*\*63",
        lambda kw: {"step": 2**70},
    ),
    case("adam-step-float", "adam_step", TE, r"^step must be an int, got float", lambda kw: {"step": 1.0}),
    case("adam-lr-str", "adam_step", TE, r"^lr must be a real number, got str", lambda kw: {"lr": "1e-3"}),
    case("ema-decay-none", "ema_update", TE, r"^decay must be a real number, got NoneType", lambda kw: {"decay": None}),
    case("fill-stream-negative", "fill_uniform", VE, r"^stream must be in \[0, 2\*\*64\), got -1",
         lambda kw: {"stream": -1}),
    case("fill-stream-str", "fill_normal", TE, r"^stream must be an int, got str", lambda kw: {"stream": "0"}),
    case("triad-scalar-str", "stream_triad", TE, r"^scalar must be a real number", lambda kw: {"scalar": "3"}),
    # ---- omega without d_uncond would silently act as omega = 1 (item 8)
    case(
        "gen-omega-without-uncond",
        "generator_grad",
        VE,
        r"^omega = 4.5 needs d_uncond .*without d_uncond omega must be 1",
        lambda kw: {"d_uncond": None, "omega": 4.5},
    ),

]


def test_case_count():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(ids) >= 70
    covered = {p.values[0].fn for p in CASES}
    assert covered == set(FUNCTIONS), set(FUNCTIONS) - covered


@pytest.mark.parametrize("c", CASES)
def test_bad_input(c: Case):
    kwargs = valid_kwargs(c.fn)
    kwargs.update(c.make(kwargs))
    with pytest.raises(c.exc, match=c.match):
        getattr(_core, c.fn)(**kwargs)


# --------------------------------------------------------------------------- float scalars and float32 (item 7)

# Every float scalar argument of every entry point, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("sample_sigma", "p_mean", False),
    ("sample_sigma", "p_std", False),
    ("sample_sigma", "sigma_min", True),
    ("sample_sigma", "sigma_max", True),
    ("sigma_table", "beta_start", False),
    ("sigma_table", "beta_end", False),
    ("sigma_table", "clip", False),
    ("precond", "sigma_data", True),
    ("cfg_combine", "omega", False),
    ("ta_loss", "sigma_data", True),
    ("generator_grad", "omega", False),
    ("generator_grad", "alpha", False),
    ("generator_grad", "min_norm", True),
    ("huber_terms", "c", True),
    ("ema_update", "decay", False),
    ("adam_step", "lr", False),
    ("adam_step", "beta1", False),
    ("adam_step", "beta2", False),
    ("adam_step", "eps", True),
    ("adam_step", "weight_decay", False),
    ("stream_triad", "scalar", False),
]


@pytest.mark.parametrize("fn,arg,positive", FLOAT_SCALARS, ids=[f"{f}-{a}" for f, a, _ in FLOAT_SCALARS])
@pytest.mark.parametrize("value", [1e39, -1e39, 3.5e38])
def test_float_scalars_beyond_float32_are_rejected(fn, arg, positive, value):
    """1e39 is a finite double but Inf in float32: before the fix omega = 1e39 ran and produced Inf/NaN."""
    kwargs = valid_kwargs(fn)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=rf"^{arg} must "):
        getattr(_core, fn)(**kwargs)


@pytest.mark.parametrize("fn,arg,positive", FLOAT_SCALARS, ids=[f"{f}-{a}" for f, a, _ in FLOAT_SCALARS])
def test_float_scalars_underflowing_float32(fn, arg, positive):
    """1e-50 becomes 0 in float32: rejected where 0 is invalid (sigma_data = 1e-50 gave Inf), else accepted."""
    kwargs = valid_kwargs(fn)
    kwargs[arg] = 1e-50
    if positive:
        with pytest.raises(ValueError, match=rf"^{arg} must be representable in float32"):
            getattr(_core, fn)(**kwargs)
    else:
        getattr(_core, fn)(**kwargs)


def test_float_scalars_cover_every_entry_point():
    with_floats = {fn for fn, _, _ in FLOAT_SCALARS}
    assert with_floats == set(FUNCTIONS) - {"fill_uniform", "fill_normal", "add_noise", "stream_copy"}


def test_omega_one_without_d_uncond_and_any_omega_with_it_are_fine():
    kwargs = valid_kwargs("generator_grad")
    _core.generator_grad(**{**kwargs, "d_uncond": None, "omega": 1.0})
    _core.generator_grad(**{k: v for k, v in kwargs.items() if k not in ("omega", "d_uncond")})  # omega = 1
    _core.generator_grad(**{**kwargs, "omega": 4.5})
    x = torch.ones(2, 3)
    K.generator_grad(x, x, x, omega=1)
    K.generator_grad(x, x, x, d_uncond=x, omega=4.5)


# --------------------------------------------------------------------------- DLPack ownership


def test_forged_capsule_is_used_and_deleted_once():
    """A well-formed hand-made capsule works, and its deleter runs exactly once."""
    producer = Forged(shape=(B, N))
    _core.fill_uniform(producer, 5)
    assert producer.deleted == 1
    written = producer.buf[: B * N]
    assert np.all((written > 0) & (written < 1))


REJECTED_CAPSULES = [
    pytest.param(versioned, falsify, id=f"{name}-{'versioned' if versioned else 'legacy'}")
    for name, falsify, kinds in [
        ("major2", {"major": 2}, (True,)),
        ("copied", {"flags": FLAG_IS_COPIED}, (True,)),
        ("read-only", {"flags": FLAG_READ_ONLY}, (True,)),
        ("device-mismatch", {"capsule_device": (2, 0)}, (True, False)),
        ("int32", {"dtype": (0, 32, 1)}, (True, False)),
        ("zero-size", {"shape": (0, N)}, (True, False)),
        ("strided", {"shape": (3,), "strides": (2,)}, (True, False)),
    ]
    for versioned in kinds
]


@pytest.mark.parametrize("versioned,falsify", REJECTED_CAPSULES)
def test_rejected_capsule_is_still_deleted(versioned, falsify):
    """Every rejected capsule that the binding consumed is handed back (deleter called once)."""
    producer = Forged(versioned=versioned, **falsify)
    with pytest.raises((TypeError, ValueError, BufferError), match=r"^out"):
        _core.fill_uniform(producer, 5)
    assert producer.deleted == 1


def test_versioned_read_only_input_is_accepted():
    """READ_ONLY only matters for outputs."""
    x = Forged(shape=(B, N), flags=FLAG_READ_ONLY)
    x.buf[:] = 1.0
    loss = empty(B)
    _core.ta_loss(x, np.zeros((B, N), np.float32), loss, weighting="unit", reduction="sum")
    np.testing.assert_allclose(loss, [N, N])
    assert x.deleted == 1


def test_producer_error_keeps_its_cause():
    """The BufferError that names the argument chains the producer's own exception."""
    with pytest.raises(BufferError, match=r"^x0: __dlpack__\(\) failed") as info:
        _core.ta_loss(f32(B, N), DlpackRaises(), empty(B), weighting="unit")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "producer failure"


class Interrupting(NonCapsuleProducer):
    def __dlpack__(self, **kwargs):
        raise KeyboardInterrupt


def test_producer_keyboard_interrupt_is_not_wrapped():
    with pytest.raises(KeyboardInterrupt):
        _core.fill_uniform(Interrupting(), 1)


def test_producer_mutating_the_list_does_not_crash():
    """A __dlpack__ that empties the caller's lists while the binding walks them must not crash.

    Runs in a subprocess: before the fix this was a segfault (the binding indexed the live list)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from diffinstruct import _core

        class Evil:
            def __init__(self, lists):
                self.lists = lists
            def __dlpack_device__(self):
                return (1, 0)
            def __dlpack__(self, **kwargs):
                for lst in self.lists:
                    lst.clear()
                return np.zeros(4, np.float32).__dlpack__(**kwargs)

        ema, params = [], [np.zeros(4, np.float32), np.zeros(4, np.float32)]
        ema.extend([Evil([ema, params]), np.zeros(4, np.float32)])
        _core.ema_update(ema, params, 0.5)
        p, g = [], [np.ones(4, np.float32)]
        m, v = [np.zeros(4, np.float32)], [np.zeros(4, np.float32)]
        p.append(Evil([p, g, m, v]))
        _core.adam_step(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- CPU/CUDA mix


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
@pytest.mark.parametrize(
    "fn,make,match",
    [
        (
            "add_noise",
            lambda kw: {"xt_out": torch.zeros(B, N, device="cuda"), "eps_out": None},
            r"xt_out is on cuda:0 but x0 is on cpu:0",
        ),
        (
            "cfg_combine",
            lambda kw: {
                "uncond": torch.ones(B, N, device="cuda"),
                "cond": torch.ones(B, N),
                "out": torch.zeros(B, N, device="cuda"),
            },
            r"cond is on cpu:0 but uncond is on cuda:0",
        ),
        (
            "precond",
            lambda kw: {k: torch.zeros(B, device="cuda") for k in ("c_skip", "c_out", "c_in", "c_noise", "weight")},
            r"c_skip is on cuda:0 but sigma is on cpu:0",
        ),
        ("stream_copy", lambda kw: {"a": torch.zeros(16, device="cuda")}, r"b is on cpu:0 but a is on cuda:0"),
    ],
    ids=["add_noise-out-on-cuda", "cfg-cond-on-cpu", "precond-outs-on-cuda", "copy-a-on-cuda"],
)
def test_cpu_cuda_mix(fn, make, match):
    kwargs = valid_kwargs(fn)
    kwargs.update(make(kwargs))
    with pytest.raises(ValueError, match=match):
        getattr(_core, fn)(**kwargs)


# --------------------------------------------------------------------------- high-level wrappers


def tt(*shape: int, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape) + 7)
    return (torch.rand(*shape, generator=g) + 0.5).to(dtype).requires_grad_(requires_grad)


WRAPPER_CASES = [
    pytest.param(
        lambda: K.add_noise(tt(B, N), torch.tensor([1.0, 0.0]), seed=1),
        ValueError,
        r"^sigma\[1\] must be finite and > 0",
        id="add_noise-sigma-zero",
    ),
    pytest.param(
        lambda: K.add_noise(tt(B, N), torch.tensor([1.0, float("nan")]), seed=1),
        ValueError,
        r"^sigma\[1\] must be finite",
        id="add_noise-sigma-nan",
    ),
    pytest.param(
        lambda: K.add_noise(torch.tensor(1.0), torch.tensor([1.0]), seed=1),
        ValueError,
        r"^x0: expected a batch",
        id="add_noise-scalar-x0",
    ),
    pytest.param(
        lambda: K.add_noise(tt(B, N), torch.ones(B), seed=-1),
        ValueError,
        r"^seed must be in",
        id="add_noise-seed-negative",
    ),
    pytest.param(
        lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), weighting="bogus"),
        ValueError,
        r"^weighting must be one of",
        id="ta_loss-weighting",
    ),
    pytest.param(
        lambda: K.ta_loss(tt(B, N, dtype=torch.float64), tt(B, N, dtype=torch.float64), torch.ones(B)),
        TypeError,
        r"^d_ta: expected dtype .* got (numpy\.)?float64",
        id="ta_loss-float64",
    ),
    pytest.param(
        lambda: K.ta_loss(tt(B, N), tt(B, N, dtype=torch.bfloat16), torch.ones(B)),
        TypeError,
        r"^x0 is bfloat16 but d_ta is float32",
        id="ta_loss-mixed-dtype",
    ),
    pytest.param(
        lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), omega=float("inf")),
        ValueError,
        r"^omega must be finite",
        id="generator_grad-omega-inf",
    ),
    pytest.param(
        lambda: K.generator_grad(tt(B, N), tt(B, N + 1), tt(B, N)),
        ValueError,
        r"^d_ta has shape",
        id="generator_grad-shape",
    ),
    pytest.param(
        lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), out=tt(N, B).t()),
        ValueError,
        r"^grad_out: expected a C-contiguous",
        id="generator_grad-out-transposed",
    ),
    pytest.param(
        lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c=0.0),
        ValueError,
        r"^c must be a finite number > 0",
        id="huber_terms-c-zero",
    ),
    pytest.param(
        lambda: K.cfg_combine(tt(N, B).t(), tt(B, N), 2.0),
        ValueError,
        r"^uncond: expected a C-contiguous",
        id="cfg_combine-transposed",
    ),
    pytest.param(
        lambda: K.adam_step([tt(4)], [tt(4)], [torch.zeros(4)], [torch.zeros(4)], lr=1e-3, beta1=1.0, step=1),
        ValueError,
        r"^beta1 must be in \[0, 1\)",
        id="adam_step-beta1-one",
    ),
    pytest.param(
        lambda: K.adam_step([tt(4)], [tt(4)], [torch.zeros(4)], [torch.zeros(4)], lr=1e-3, step=0),
        ValueError,
        r"^step must be >= 1",
        id="adam_step-step-zero",
    ),
    pytest.param(
        lambda: K.adam_step(
            [tt(4)], [tt(4)], [torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)], lr=1e-3, step=1
        ),
        TypeError,
        r"^exp_avgs\[0\]: expected dtype float32",
        id="adam_step-bf16-state",
    ),
    pytest.param(
        lambda: K.ema_update([tt(3)], [tt(3), tt(3)], 0.9),
        ValueError,
        r"^params has 2 tensors but ema has 1",
        id="ema_update-lengths",
    ),
    pytest.param(
        lambda: K.precond(torch.tensor([0.5, -1.0])),
        ValueError,
        r"^sigma\[1\] must be finite and > 0",
        id="precond-negative-sigma",
    ),
    pytest.param(
        lambda: K.sigma_table("scaled_linear", 10, beta_end=-0.012),
        ValueError,
        r"^beta_end must be in",
        id="sigma_table-negative-beta",
    ),
    pytest.param(
        lambda: K.sample_sigma(4, seed=1, sigma_min=0.0),
        ValueError,
        r"^sigma_min must be",
        id="sample_sigma-sigma_min-zero",
    ),
    pytest.param(
        lambda: K.sample_sigma(4, seed=1, table=[0.1, 0.05, 1.0]),
        ValueError,
        r"^table must be strictly ascending",
        id="sample_sigma-unsorted-table",
    ),
    pytest.param(
        lambda: K.fill_uniform(torch.zeros(B, N, dtype=torch.int32), 1),
        TypeError,
        r"^out: expected dtype",
        id="fill_uniform-int32",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.generator_grad(None, tt(B, N), tt(B, N)), TypeError, r"^x0: a tensor is required",
                 id="generator_grad-x0-none"),
    pytest.param(lambda: K.generator_grad(tt(B, N), [1.0] * N, tt(B, N)), TypeError,
                 r"^d_ta: expected a torch.Tensor or numpy.ndarray, got list", id="generator_grad-d_ta-list"),
    pytest.param(lambda: K.cfg_combine(tt(B, N).to_sparse(), tt(B, N), 2.0), ValueError,
                 r"^uncond: expected a dense \(strided\) tensor, got layout torch.sparse_coo", id="cfg-sparse"),
    pytest.param(lambda: K.ta_loss(tt(B, N), torch.ones(B, N, device="meta"), torch.ones(B)), ValueError,
                 r"^x0: expected a CPU or CUDA tensor, got device meta", id="ta_loss-meta"),
    pytest.param(lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B).to_sparse(), c=0.1), ValueError,
                 r"^sigma: expected a dense", id="huber-sigma-sparse"),
    pytest.param(lambda: K.sample_sigma("3", seed=1), TypeError, r"^batch must be an int, got str",
                 id="sample_sigma-batch-str"),
    pytest.param(lambda: K.sample_sigma(3.0, seed=1), TypeError, r"^batch must be an int, got float",
                 id="sample_sigma-batch-float"),
    pytest.param(lambda: K.sample_sigma(0, seed=1), ValueError, r"^batch must be >= 1, got 0",
                 id="sample_sigma-batch-zero"),
    pytest.param(lambda: K.sample_sigma(2**70, seed=1), ValueError, r"^batch = \d+: cannot allocate",
                 id="sample_sigma-batch-huge"),
    pytest.param(lambda: K.sample_sigma(3, seed=1, device="nowhere"), ValueError, r"^device: ",
                 id="sample_sigma-device-bad"),
    pytest.param(lambda: K.sample_sigma(3, seed=1, device="meta"), ValueError,
                 r"^device must be a CPU or CUDA device", id="sample_sigma-device-meta"),
    pytest.param(lambda: K.sample_sigma(3, seed=1, device=1.5), TypeError, r"^device must be a str",
                 id="sample_sigma-device-float"),
    pytest.param(lambda: K.sample_sigma(3, seed=1, table="abc"), TypeError, r"^table: expected a tensor or a sequence",
                 id="sample_sigma-table-str"),
    pytest.param(lambda: K.sample_sigma(3, seed=1, snap="yes"), TypeError, r"^snap must be a bool",
                 id="sample_sigma-snap-str"),
    pytest.param(lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), need_grad=torch.ones(2)), TypeError,
                 r"^need_grad must be a bool, got Tensor", id="ta_loss-need_grad-tensor"),
    pytest.param(lambda: K.add_noise(tt(B, N), torch.ones(B), 1, return_eps="no"), TypeError,
                 r"^return_eps must be a bool", id="add_noise-return_eps-str"),
    pytest.param(lambda: K.add_noise(tt(B, N), torch.ones(B), 1, flow=None), TypeError, r"^flow must be a bool",
                 id="add_noise-flow-none"),
    pytest.param(lambda: K.ema_update(None, [tt(3)], 0.5), TypeError, r"^ema must be a list or tuple of tensors",
                 id="ema_update-none"),
    pytest.param(lambda: K.adam_step([tt(4)], [None], None, [torch.zeros(4)], lr=1e-3, step=1), TypeError,
                 r"^grads\[0\]: a tensor is required, got None", id="adam_step-grad-none"),
    pytest.param(lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, step=1, decoupled="1"),
                 TypeError, r"^decoupled must be a bool", id="adam_step-decoupled-str"),
    pytest.param(lambda: K.precond("abc"), TypeError, r"^sigma: expected a tensor or a sequence", id="precond-str"),
    pytest.param(lambda: K.precond(None), TypeError, r"^sigma: a tensor is required", id="precond-none"),
    pytest.param(lambda: K.fill_uniform([0.0] * 4, 1), TypeError, r"^out: expected a torch.Tensor", id="fill-list"),
    pytest.param(lambda: K.fill_uniform(torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8), 1),
                 BufferError, r"^out: cannot be passed through DLPack", id="fill-quantized",
                 marks=pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")),
    pytest.param(lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), omega=4.5), ValueError,
                 r"^omega = 4.5 needs d_uncond", id="generator_grad-omega-without-uncond"),
    pytest.param(lambda: K.cfg_combine(tt(B, N), tt(B, N), 1e39), ValueError, r"^omega must be at most",
                 id="cfg-omega-1e39"),
    pytest.param(lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), sigma_data=1e-50), ValueError,
                 r"^sigma_data must be representable in float32", id="ta_loss-sigma_data-underflow"),
    pytest.param(lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), min_norm=1e-50), ValueError,
                 r"^min_norm must be representable in float32", id="generator_grad-min_norm-underflow"),
    pytest.param(lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c=1e39), ValueError,
                 r"^c must be representable in float32", id="huber_terms-c-overflow"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_wrappers_accept_requires_grad_and_low_precision(dtype):
    """Leaf tensors that require grad (and bf16/f16 tensors) are fine: the wrappers detach them."""
    x0 = tt(B, N, dtype=dtype, requires_grad=True)
    d_ta, d_cond, d_uncond = (tt(B, N, dtype=dtype) + k for k in (0.1, 0.2, 0.3))
    sigma = torch.tensor([0.5, 2.0], requires_grad=True)

    xt = K.add_noise(x0, sigma, seed=3)
    assert xt.dtype == dtype and xt.shape == x0.shape and bool(torch.isfinite(xt).all())

    ta = K.ta_loss(d_ta.requires_grad_(True), x0, sigma)
    assert ta.loss.dtype == torch.float32 and bool(torch.isfinite(ta.loss).all())
    assert ta.grad.dtype == dtype and int(ta.nonfinite.sum()) == 0

    g = K.generator_grad(x0, d_ta, d_cond, d_uncond=d_uncond, omega=2.0)
    assert g.grad.dtype == dtype and bool(torch.isfinite(g.grad).all())
    x0.backward(g.grad)  # the documented use: the kernel's G goes into autograd
    assert x0.grad is not None and x0.grad.shape == x0.shape

    h = K.huber_terms(x0, d_ta, d_cond, sigma, c=0.1)
    assert h.a.dtype == dtype and bool(torch.isfinite(h.h).all())

    out = K.cfg_combine(d_uncond, d_cond, 1.5)
    assert out.dtype == dtype

    noise = K.fill_normal(torch.empty(B, N, dtype=dtype), 9)
    assert bool(torch.isfinite(noise).all())

    pre = K.precond(sigma)
    assert set(pre) == {"c_skip", "c_out", "c_in", "c_noise", "weight"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_optimizer_wrappers_accept_parameters(dtype):
    """nn.Parameter (requires_grad=True) params are updated in place without autograd errors."""
    p = torch.nn.Parameter(tt(3, 4, dtype=dtype))
    before = p.detach().clone()
    grad = tt(3, 4, dtype=dtype)
    m, v = torch.zeros(3, 4), torch.zeros(3, 4)
    K.adam_step([p], [grad], [m], [v], lr=1e-2, beta1=0.9, step=1)
    assert p.requires_grad and not torch.equal(p.detach(), before)
    ema = tt(3, 4, dtype=dtype)
    ema_before = ema.clone()
    K.ema_update([ema], [p], 0.5)
    assert not torch.equal(ema, ema_before)


# --------------------------------------------------------------------------- NaN / Inf inside tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_nonfinite_values_are_counted_and_propagate(dtype):
    """NaN/Inf inside tensors never raise; they are counted per sample and reach the outputs."""
    nan, inf = float("nan"), float("inf")

    # ta_loss: NaN in sample 0, +/-Inf twice in sample 1
    d_ta, x0 = tt(B, N, dtype=dtype), tt(B, N, dtype=dtype) + 0.25
    d_ta[0, 3] = nan
    x0[1, 0], x0[1, 1] = inf, -inf
    ta = K.ta_loss(d_ta, x0, torch.tensor([0.5, 2.0]))
    assert ta.nonfinite.tolist() == [1, 2]
    assert bool(torch.isnan(ta.loss[0])) and bool(torch.isinf(ta.loss[1]))
    grad = ta.grad.float()
    assert bool(torch.isnan(grad[0, 3])) and float(grad[1, 0]) == -inf and float(grad[1, 1]) == inf
    finite = torch.ones(B, N, dtype=torch.bool)
    finite[0, 3] = finite[1, 0] = finite[1, 1] = False
    assert bool(torch.isfinite(grad[finite]).all())

    # generator_grad: NaN x0 in sample 0 (poisons its normaliser), Inf D_TA and Inf dr in sample 1
    x0, d_ta, d_cond, dr = (tt(B, N, dtype=dtype) + k for k in (0.0, 0.5, 0.1, 0.2))
    x0[0, 3] = nan
    d_ta[1, 0] = inf
    dr[1, 2] = inf
    g = K.generator_grad(x0, d_ta, d_cond, dr=dr, alpha=0.5)
    # sample 0: the NaN x0 element, plus the other N - 1 elements of G it poisons through W_b
    # (nonfinite counts non-finite outputs too); sample 1: the two elements with an Inf input
    assert g.nonfinite.tolist() == [N, 2]
    assert bool(torch.isnan(g.ref_dist[0])) and bool(torch.isnan(g.weight[0]))
    assert bool(torch.isnan(g.grad[0].float()).all())
    assert bool(torch.isfinite(g.weight[1])) and float(g.gap[1]) == inf and float(g.surrogate[1]) == inf
    row = g.grad[1].float()
    assert float(row[0]) == inf and float(row[2]) == -inf
    assert bool(torch.isfinite(row[[1, 3, 4, 5]]).all())

    # huber_terms: NaN D_p in sample 0, Inf D_q in sample 1; either makes h non-finite, so every
    # a, b, d' element of the sample is NaN and counted (an element counts once, whatever is bad at it)
    x0, d_p, d_q = (tt(B, N, dtype=dtype) + k for k in (0.0, 0.3, 0.6))
    d_p[0, 2] = nan
    d_q[1, 4] = inf
    h = K.huber_terms(x0, d_p, d_q, torch.tensor([0.5, 2.0]), c=0.1)
    assert h.nonfinite.tolist() == [N, N]
    assert bool(torch.isnan(h.ysq[0])) and bool(torch.isnan(h.h[0])) and bool(torch.isnan(h.value[0]))
    assert bool(torch.isnan(h.a[0].float()).all()) and bool(torch.isnan(h.dprime[0].float()).all())
    assert not bool(torch.isfinite(h.ysq[1])) and not bool(torch.isfinite(h.yr[1]))


def test_nonfinite_numpy_core_counts():
    """The same through _core with NumPy arrays: ta_loss without grad_out, counts only."""
    d_ta = np.ones((3, 40), np.float32)
    x0 = np.zeros((3, 40), np.float32)
    d_ta[0, [1, 5, 39]] = np.nan
    d_ta[2, :] = np.inf
    loss, bad = empty(3), np.full(3, -1, np.int64)
    _core.ta_loss(d_ta, x0, loss, None, None, bad, weighting="unit", reduction="sum")
    assert bad.tolist() == [3, 0, 40]
    assert np.isnan(loss[0]) and loss[1] == 40.0 and loss[2] == np.inf
