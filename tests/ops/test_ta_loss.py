"""ta_loss: the TA loss and its gradient against float64 NumPy and autograd; non-finite counts; bad input;
every backend alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, as64, requires_cuda
from core_args import (
    BE,
    TE,
    VE,
    B,
    N,
    bad_input_test,
    case,
    empty,
    f32,
    float_scalar_tests,
    read_only,
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
@pytest.mark.parametrize("weighting,reduction", [("edm", "mean"), ("unit", "sum"), ("edm", "sum")])
def test_ta_loss(dtype, shape, weighting, reduction):
    d, x0 = make(shape, dtype, 4), make(shape, dtype, 5)
    sigma = sigma_for(shape[0])
    res = kernels.ta_loss(d, x0, sigma, weighting=weighting, reduction=reduction)
    loss, grad = ref.ta_loss(as64(d), as64(x0), sigma.double().numpy(), weighting, 0.5, reduction)
    np.testing.assert_allclose(res.loss.numpy(), loss, rtol=REDUCTION_RTOL)
    assert_elementwise(res.grad, grad, dtype)
    assert res.nonfinite.tolist() == [0] * shape[0]


def test_ta_gradient_is_the_autograd_gradient_of_the_mean_loss():
    d = make((4, 3, 8, 8), torch.float32, 6).requires_grad_(True)
    x0 = make((4, 3, 8, 8), torch.float32, 7)
    sigma = sigma_for(4)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    loss = (lam * ((d - x0) ** 2).mean(dim=(1, 2, 3))).mean()
    loss.backward()
    res = kernels.ta_loss(d, x0, sigma)
    torch.testing.assert_close(res.grad, d.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.loss.mean(), loss.detach(), rtol=1e-5, atol=0)


def _overflow_case(dtype, device="cpu"):
    """A call whose outputs overflow dtype from finite inputs, in every third element."""
    hot = (torch.arange(12, device=device) % 3 == 0).reshape(2, 6)
    zeros = torch.zeros(2, 6, dtype=dtype, device=device)
    ones_where_hot = hot.to(dtype)
    # TA at a small sigma: lambda(1e-3) ~ 1e6 overflows float16; float32/bfloat16 need sigma = 1e-18 and d = 1e3
    small = torch.full((2,), 1e-3 if dtype == torch.float16 else 1e-18, device=device)
    d = ones_where_hot if dtype == torch.float16 else ones_where_hot * 1000
    return lambda: kernels.ta_loss(d, zeros, small, reduction="sum")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_overflowing_outputs_are_counted_as_nonfinite(dtype):
    """Outputs that overflow to Inf from finite inputs count in `nonfinite` (inputs alone gave 0),
    element by element, and agree with the PyTorch reference."""
    res = _overflow_case(dtype)()
    vec = res.grad
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
    ta = torch_ref.ta_loss(hot, zeros, torch.full((2,), 1e-3), "edm", 0.5, "sum", True)
    assert ta.nonfinite.tolist() == [2, 2]


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["ta_loss"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
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
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("ta_loss", "sigma_data", True),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


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


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
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
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.ta_loss(tt(B, N), torch.ones(B, N, device="meta"), torch.ones(B)), ValueError,
                 r"^x0: expected a CPU or CUDA tensor, got device meta", id="ta_loss-meta"),
    pytest.param(lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), need_grad=torch.ones(2)), TypeError,
                 r"^need_grad must be a bool, got Tensor", id="ta_loss-need_grad-tensor"),
    pytest.param(lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), sigma_data=1e-50), ValueError,
                 r"^sigma_data must be representable in float32", id="ta_loss-sigma_data-underflow"),
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
    c = kernels.ta_loss(ta, x0, sigma)
    r = torch_ref.ta_loss(ta, x0, sigma, "edm", 0.5, "mean", True)
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_requires_grad_and_low_precision(dtype):
    """Leaf tensors that require grad (and bf16/f16 tensors) are fine: the wrapper detaches them."""
    x0, d_ta, d_cond, d_uncond, sigma = grad_inputs(dtype)
    ta = K.ta_loss(d_ta.requires_grad_(True), x0, sigma)
    assert ta.loss.dtype == torch.float32 and bool(torch.isfinite(ta.loss).all())
    assert ta.grad.dtype == dtype and int(ta.nonfinite.sum()) == 0


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


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("weighting-int", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), weighting=1)),
    ("reduction-bogus", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), reduction="max")),
    ("edm-without-sigma", lambda: K.ta_loss(tt(B, N), tt(B, N))),
    ("sigma_data-zero", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B), sigma_data=0.0)),
    ("sigma-length", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B + 2))),
    ("sigma-float16", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.ones(B, dtype=torch.float16))),
    ("sigma-zero", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.tensor([1.0, 0.0]))),
    ("sigma-nan-unit", lambda: K.ta_loss(tt(B, N), tt(B, N), torch.tensor([float("nan"), 1.0]), weighting="unit")),
    ("x0-shape", lambda: K.ta_loss(tt(B, N), tt(B, N + 1), torch.ones(B))),
    ("x0-numpy-float64", lambda: K.ta_loss(f32(B, N), np.zeros((B, N)), vec(1.0, 2.0))),
    ("d_ta-transposed", lambda: K.ta_loss(transposed(B, N), tt(B, N), torch.ones(B))),
    ("d_ta-empty", lambda: K.ta_loss(torch.zeros(0, N), torch.zeros(0, N), torch.ones(0))),
]

VALID = [
    ("edm-mean", lambda: K.ta_loss(make((3, 4, 7, 9), torch.float32, 4), make((3, 4, 7, 9), torch.float32, 5),
                                   sigma_for(3))),
    ("unit-sum-bf16", lambda: K.ta_loss(make((2, 40), torch.bfloat16, 6), make((2, 40), torch.bfloat16, 7),
                                        weighting="unit", reduction="sum")),
    ("no-grad-numpy", lambda: K.ta_loss(make((4, 9), torch.float32, 8).numpy(), make((4, 9), torch.float32, 9).numpy(),
                                        sigma_for(4).numpy(), need_grad=False)),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)
