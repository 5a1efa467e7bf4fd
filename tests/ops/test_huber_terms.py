"""huber_terms: the DI* pseudo-Huber pieces against float64 NumPy; non-finite counts; bad input; every
backend alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, as64, requires_cuda
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
    transposed,
    tt,
    valid_kwargs,
    vec,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K
from diffinstruct.kernels import reference as torch_ref
from op_helpers import (
    LOW_PRECISION,
    LOW_PRECISION_IDS,
    REDUCTION_RTOL,
    SHAPES,
    assert_backends_agree,
    assert_deterministic,
    assert_elementwise,
    assert_same_error,
    calls,
    grad_inputs,
    make,
    sigma_for,
)

# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c,weighting", [(1e-3, "sigma2"), (10.0, "sigma2"), (1.0, "unit"), (1e4, "unit")])
def test_huber_terms(dtype, shape, c, weighting):
    x0, dp, dq = make(shape, dtype, 18), make(shape, dtype, 19), make(shape, dtype, 20)
    sigma = sigma_for(shape[0])
    res = kernels.huber_terms(x0, dp, dq, sigma, c, weighting=weighting)
    want = ref.huber_terms(as64(x0), as64(dp), as64(dq), sigma.double().numpy(), c, weighting)
    for key in ("ysq", "h", "value"):
        np.testing.assert_allclose(getattr(res, key).numpy(), want[key], rtol=REDUCTION_RTOL, err_msg=key)
    y = ref.per_sample(as64(dp) - as64(dq))
    r = ref.per_sample(as64(dq) - as64(x0))
    yr_scale = (np.abs(y * r).sum(1) / sigma.double().numpy() ** 4).max()
    np.testing.assert_allclose(res.yr.numpy(), want["yr"], rtol=0, atol=1e-5 * yr_scale)
    for key in ("a", "b", "dprime"):
        assert_elementwise(getattr(res, key), want[key], dtype)


def _overflow_case(dtype, device="cpu"):
    """A call whose outputs overflow dtype from finite inputs, in every third element."""
    hot = (torch.arange(12, device=device) % 3 == 0).reshape(2, 6)
    zeros = torch.zeros(2, 6, dtype=dtype, device=device)
    ones_where_hot = hot.to(dtype)
    # DI*: y = 0, r = 1, h = c: b = r / (c B) overflows float16
    return lambda: kernels.huber_terms(zeros, ones_where_hot, ones_where_hot, torch.ones(2, device=device), c=1e-6,
                                  weighting="unit")


@pytest.mark.parametrize("dtype", [torch.float16])
def test_overflowing_outputs_are_counted_as_nonfinite(dtype):
    """Outputs that overflow to Inf from finite inputs count in `nonfinite` (inputs alone gave 0),
    element by element, and agree with the PyTorch reference."""
    res = _overflow_case(dtype)()
    vec = res.b
    assert not bool(torch.isfinite(vec.float()).all())
    assert res.nonfinite.tolist() == [2, 2], res.nonfinite.tolist()  # elements 0 and 3 of each row
    assert res.nonfinite.tolist() == (~torch.isfinite(vec.float().reshape(2, -1))).sum(1).tolist()


@requires_cuda
def test_overflow_counts_cpu_and_cuda_agree():
    on_cpu, on_cuda = _overflow_case(torch.float16), _overflow_case(torch.float16, "cuda")
    assert on_cpu().nonfinite.tolist() == on_cuda().nonfinite.cpu().tolist() == [2, 2]


def test_overflow_counts_match_the_torch_reference():
    """The reference (the CUDA fallback) counts the same elements."""
    zeros = torch.zeros(2, 6, dtype=torch.float16)
    hot = (torch.arange(12) % 3 == 0).reshape(2, 6).to(torch.float16)
    hub = torch_ref.huber_terms(zeros, hot, hot, torch.ones(2), 1e-6, "unit")
    assert hub.nonfinite.tolist() == [2, 2]


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["huber_terms"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("huber_terms", "c", True),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c=0.0),
        ValueError,
        r"^c must be a finite number > 0",
        id="huber_terms-c-zero",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B).to_sparse(), c=0.1), ValueError,
                 r"^sigma: expected a dense", id="huber-sigma-sparse"),
    pytest.param(lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c=1e39), ValueError,
                 r"^c must be representable in float32", id="huber_terms-c-overflow"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_reference_matches_c_kernels():
    """The PyTorch reference (the CUDA fallback) agrees with the C kernels."""
    shape = (3, 4, 7, 9)
    x0, ta, cond, uncond, dr = (make(shape, torch.float32, s) for s in range(21, 26))
    sigma = sigma_for(3)
    c = kernels.huber_terms(x0, cond, ta, sigma, 0.5)
    r = torch_ref.huber_terms(x0, cond, ta, sigma, 0.5, "sigma2")
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_requires_grad_and_low_precision(dtype):
    """Leaf tensors that require grad (and bf16/f16 tensors) are fine: the wrapper detaches them."""
    x0, d_ta, d_cond, d_uncond, sigma = grad_inputs(dtype)
    h = K.huber_terms(x0, d_ta.requires_grad_(True), d_cond, sigma, c=0.1)
    assert h.a.dtype == dtype and bool(torch.isfinite(h.h).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_nonfinite_values_are_counted_and_propagate(dtype):
    """NaN/Inf inside tensors never raise; they are counted per sample and reach the outputs."""
    nan, inf = float("nan"), float("inf")

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


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("c-nan", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c=float("nan"))),
    ("c-str", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), c="0.1")),
    ("weighting-bogus", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(B), 0.1, weighting="sigma")),
    ("sigma-length", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.ones(1), 0.1)),
    ("sigma-nan", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N), torch.tensor([1.0, float("nan")]), 0.1)),
    ("sigma-numpy-float64", lambda: K.huber_terms(f32(B, N), f32(B, N), f32(B, N), np.ones(B), 0.1)),
    ("d_p-shape", lambda: K.huber_terms(tt(B, N), tt(B, 2 * N), tt(B, N), torch.ones(B), 0.1)),
    ("d_q-dtype", lambda: K.huber_terms(tt(B, N), tt(B, N), tt(B, N, dtype=torch.float16), torch.ones(B), 0.1)),
    ("x0-transposed", lambda: K.huber_terms(transposed(B, N), tt(B, N), tt(B, N), torch.ones(B), 0.1)),
]

VALID = [
    ("sigma2-f32", lambda: K.huber_terms(*(make((3, 4, 7, 9), torch.float32, s) for s in (18, 19, 20)),
                                         sigma_for(3), 0.5)),
    ("unit-bf16", lambda: K.huber_terms(*(make((2, 40), torch.bfloat16, s) for s in (1, 2, 3)), sigma_for(2),
                                        10.0, weighting="unit")),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)
