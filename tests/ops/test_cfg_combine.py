"""cfg_combine: D_uncond + omega (D_cond - D_uncond) against float64 NumPy; bad input; every backend alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, as64
from core_args import (
    TE,
    VE,
    B,
    N,
    bad_input_test,
    case,
    empty,
    f32,
    float_scalar_tests,
    overlapping_pair,
    read_only,
    tt,
    valid_kwargs,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K
from diffinstruct.kernels import reference as torch_ref
from op_helpers import (
    LOW_PRECISION,
    LOW_PRECISION_IDS,
    assert_backends_agree,
    assert_deterministic,
    assert_elementwise,
    assert_same_error,
    calls,
    grad_inputs,
    make,
)

# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("omega", [1.0, 4.5, -0.5])
def test_cfg_combine(dtype, omega):
    u, c = make((3, 4, 7, 9), dtype, 2), make((3, 4, 7, 9), dtype, 3)
    out = kernels.cfg_combine(u, c, omega)
    assert_elementwise(out, ref.cfg(as64(u), as64(c), omega), dtype)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["cfg_combine"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("cfg_combine", "omega", False),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
def test_cpu_cuda_mix():
    kwargs = valid_kwargs("cfg_combine")
    kwargs.update({
        "uncond": torch.ones(B, N, device="cuda"),
        "cond": torch.ones(B, N),
        "out": torch.zeros(B, N, device="cuda"),
    })
    with pytest.raises(ValueError, match=r"cond is on cpu:0 but uncond is on cuda:0"):
        _core.cfg_combine(**kwargs)


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.cfg_combine(tt(N, B).t(), tt(B, N), 2.0),
        ValueError,
        r"^uncond: expected a C-contiguous",
        id="cfg_combine-transposed",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.cfg_combine(tt(B, N).to_sparse(), tt(B, N), 2.0), ValueError,
                 r"^uncond: expected a dense \(strided\) tensor, got layout torch.sparse_coo", id="cfg-sparse"),
    pytest.param(lambda: K.cfg_combine(tt(B, N), tt(B, N), 1e39), ValueError, r"^omega must be at most",
                 id="cfg-omega-1e39"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_reference_matches_c_kernels():
    """The PyTorch reference (the CUDA fallback) agrees with the C kernels."""
    shape = (3, 4, 7, 9)
    x0, ta, cond, uncond, dr = (make(shape, torch.float32, s) for s in range(21, 26))
    torch.testing.assert_close(kernels.cfg_combine(uncond, cond, 2.0), torch_ref.cfg_combine(uncond, cond, 2.0))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_low_precision(dtype):
    """bf16/f16 tensors are fine."""
    x0, d_ta, d_cond, d_uncond, sigma = grad_inputs(dtype)
    out = K.cfg_combine(d_uncond, d_cond, 1.5)
    assert out.dtype == dtype


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("cond-shape", lambda: K.cfg_combine(tt(B, N), tt(B, N + 1), 2.0)),
    ("cond-dtype", lambda: K.cfg_combine(tt(B, N), tt(B, N, dtype=torch.float16), 2.0)),
    ("cond-float64-numpy", lambda: K.cfg_combine(f32(B, N), np.zeros((B, N)), 2.0)),
    ("uncond-empty", lambda: K.cfg_combine(torch.zeros(0), torch.zeros(0), 2.0)),
    ("out-dtype", lambda: K.cfg_combine(tt(B, N), tt(B, N), 2.0, out=torch.empty(B, N, dtype=torch.bfloat16))),
    ("out-is-uncond", lambda: (lambda u: K.cfg_combine(u, tt(B, N), 2.0, out=u))(tt(B, N))),
    ("out-overlaps-cond", lambda: (lambda pair: K.cfg_combine(f32(B, N), pair[0], 2.0, out=pair[1]))(
        overlapping_pair((B, N), 3))),
    ("out-read-only-numpy", lambda: K.cfg_combine(f32(B, N), f32(B, N), 2.0, out=read_only(empty(B, N)))),
    ("out-neg-view", lambda: K.cfg_combine(tt(B, N), tt(B, N), 2.0, out=torch._neg_view(torch.zeros(B, N)))),
    ("omega-nan", lambda: K.cfg_combine(tt(B, N), tt(B, N), float("nan"))),
    ("omega-str", lambda: K.cfg_combine(tt(B, N), tt(B, N), "2")),
    ("omega-complex", lambda: K.cfg_combine(tt(B, N), tt(B, N), 2j)),
    ("omega-huge-int", lambda: K.cfg_combine(tt(B, N), tt(B, N), 10**400)),
]

VALID = [
    ("f32", lambda: K.cfg_combine(make((3, 4, 7, 9), torch.float32, 2), make((3, 4, 7, 9), torch.float32, 3), 4.5)),
    ("bf16", lambda: K.cfg_combine(make((5, 33), torch.bfloat16, 4), make((5, 33), torch.bfloat16, 5), -0.5)),
    ("numpy-0d", lambda: K.cfg_combine(np.full((), 1.5, np.float32), np.zeros((), np.float32), 2)),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)
