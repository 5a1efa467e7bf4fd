"""generator_grad: the DI++ generator gradient against float64 NumPy and autograd; the normaliser floor;
non-finite counts; bad input; every backend alike."""

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
    step_slice,
    tt,
    valid_kwargs,
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
)

# --------------------------------------------------------------------------- correctness


GEN_CASES = [
    dict(cfg=False, reward=False, weighting="normalized"),
    dict(cfg=True, reward=False, weighting="normalized"),
    dict(cfg=True, reward=True, weighting="normalized"),
    dict(cfg=True, reward=True, weighting="unit"),
    dict(cfg=False, reward=True, weighting="unit"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", GEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_generator_grad(dtype, shape, case):
    x0, ta, cond = make(shape, dtype, 8), make(shape, dtype, 9), make(shape, dtype, 10)
    uncond = make(shape, dtype, 11) if case["cfg"] else None
    dr = make(shape, dtype, 12) if case["reward"] else None
    omega, alpha = (4.5 if case["cfg"] else 1.0), (2.0 if case["reward"] else 0.0)
    res = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=omega, dr=dr, alpha=alpha,
                                 weighting=case["weighting"])
    want = ref.generator_grad(as64(x0), as64(ta), as64(cond), None if uncond is None else as64(uncond), omega,
                              None if dr is None else as64(dr), alpha, case["weighting"])
    assert res.grad.dtype == dtype
    assert_elementwise(res.grad, want["grad"], dtype)
    for key in ("weight", "ref_dist", "gap"):
        np.testing.assert_allclose(getattr(res, key).numpy(), want[key], rtol=REDUCTION_RTOL, err_msg=key)
    # the surrogate is a signed sum with cancellation: compare against its absolute scale
    scale = want["weight"] * np.abs(ref.per_sample(as64(ta)) * ref.per_sample(as64(x0))).sum(1)
    np.testing.assert_allclose(res.surrogate.numpy(), want["surrogate"], rtol=0, atol=float(1e-5 * scale.max()))
    assert res.nonfinite.tolist() == [0] * shape[0]


def test_generator_grad_normaliser_floor():
    x0 = torch.ones(2, 16)
    ref_same = x0.clone()  # |x0 - D_ref| = 0 -> W = 1 / 1e-5
    ta = x0 + 1.0
    res = kernels.generator_grad(x0, ta, ref_same, min_norm=1e-5)
    torch.testing.assert_close(res.weight, torch.full((2,), 1e5), rtol=1e-6, atol=0)
    torch.testing.assert_close(res.grad, torch.full_like(x0, 1e5 / 2), rtol=1e-6, atol=0)


def test_generator_grad_matches_autograd_of_the_pseudo_loss():
    """x0.backward(G) equals autograd of (1/B) sum_b [-alpha r_b + W_b <sg(D_TA - D_ref), x0_b>]."""
    b = 3
    x0 = make((b, 4, 6, 6), torch.float32, 13).requires_grad_(True)
    ta, cond, uncond = (make((b, 4, 6, 6), torch.float32, s) for s in (14, 15, 16))
    target = make((b, 4, 6, 6), torch.float32, 17)
    reward = -((x0 - target) ** 2).sum(dim=(1, 2, 3))  # r(x0) = -|x0 - a|^2
    dr = torch.autograd.grad(reward.sum(), x0, retain_graph=True)[0]
    with torch.no_grad():
        d_ref = uncond + 4.5 * (cond - uncond)
        w = 1.0 / (x0 - d_ref).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5)
    alpha = 0.3
    pseudo = (-alpha * reward + w * ((ta - d_ref) * x0).sum(dim=(1, 2, 3))).sum() / b
    (want,) = torch.autograd.grad(pseudo, x0)
    res = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=4.5, dr=dr, alpha=alpha)
    torch.testing.assert_close(res.grad, want, rtol=1e-5, atol=1e-6)


def test_nonfinite_inputs_propagate_and_are_counted():
    x0 = torch.zeros(2, 40)
    ta = torch.ones(2, 40)
    cond = torch.zeros(2, 40)
    ta[1, 3] = float("nan")
    ta[1, 7] = float("inf")
    res = kernels.generator_grad(x0, ta, cond, weighting="unit")
    assert res.nonfinite.tolist() == [0, 2]
    assert torch.isnan(res.grad[1, 3]) and torch.isinf(res.grad[1, 7])
    assert torch.isfinite(res.grad[0]).all()


def _overflow_case(dtype, device="cpu"):
    """A call whose outputs overflow dtype from finite inputs, in every third element."""
    hot = (torch.arange(12, device=device) % 3 == 0).reshape(2, 6)
    zeros = torch.zeros(2, 6, dtype=dtype, device=device)
    ones_where_hot = hot.to(dtype)
    # generator at the W_b floor: x0 == D_cond, so W_b = 1 / min_norm; float16 only (W_b is float32)
    return lambda: kernels.generator_grad(zeros, ones_where_hot, zeros, min_norm=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16])
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
    gen = torch_ref.generator_grad(zeros, hot, zeros, None, 1.0, None, 0.0, "normalized", 1e-6)
    assert gen.nonfinite.tolist() == [2, 2]


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["generator_grad"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case(
        "gen-weighting-surrogate",
        "generator_grad",
        VE,
        r"^weighting must be one of unit, normalized, got '\\ud800'",
        lambda kw: {"weighting": "\ud800"},
    ),
    # ---- omega without d_uncond would silently act as omega = 1 (item 8)
    case(
        "gen-omega-without-uncond",
        "generator_grad",
        VE,
        r"^omega = 4.5 needs d_uncond .*without d_uncond omega must be 1",
        lambda kw: {"d_uncond": None, "omega": 4.5},
    ),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("generator_grad", "omega", False),
    ("generator_grad", "alpha", False),
    ("generator_grad", "min_norm", True),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


def test_omega_one_without_d_uncond_and_any_omega_with_it_are_fine():
    kwargs = valid_kwargs("generator_grad")
    _core.generator_grad(**{**kwargs, "d_uncond": None, "omega": 1.0})
    _core.generator_grad(**{k: v for k, v in kwargs.items() if k not in ("omega", "d_uncond")})  # omega = 1
    _core.generator_grad(**{**kwargs, "omega": 4.5})
    x = torch.ones(2, 3)
    K.generator_grad(x, x, x, omega=1)
    K.generator_grad(x, x, x, d_uncond=x, omega=4.5)


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
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
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.generator_grad(None, tt(B, N), tt(B, N)), TypeError, r"^x0: a tensor is required",
                 id="generator_grad-x0-none"),
    pytest.param(lambda: K.generator_grad(tt(B, N), [1.0] * N, tt(B, N)), TypeError,
                 r"^d_ta: expected a torch.Tensor or numpy.ndarray, got list", id="generator_grad-d_ta-list"),
    pytest.param(lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), omega=4.5), ValueError,
                 r"^omega = 4.5 needs d_uncond", id="generator_grad-omega-without-uncond"),
    pytest.param(lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), min_norm=1e-50), ValueError,
                 r"^min_norm must be representable in float32", id="generator_grad-min_norm-underflow"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_reference_matches_c_kernels():
    """The PyTorch reference (the CUDA fallback) agrees with the C kernels."""
    shape = (3, 4, 7, 9)
    x0, ta, cond, uncond, dr = (make(shape, torch.float32, s) for s in range(21, 26))
    c = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=3.0, dr=dr, alpha=0.5)
    r = torch_ref.generator_grad(x0, ta, cond, uncond, 3.0, dr, 0.5, "normalized", 1e-5)
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_requires_grad_and_low_precision(dtype):
    """Leaf tensors that require grad (and bf16/f16 tensors) are fine: the wrapper detaches them."""
    x0, d_ta, d_cond, d_uncond, sigma = grad_inputs(dtype)
    g = K.generator_grad(x0, d_ta, d_cond, d_uncond=d_uncond, omega=2.0)
    assert g.grad.dtype == dtype and bool(torch.isfinite(g.grad).all())
    x0.backward(g.grad)  # the documented use: the kernel's G goes into autograd
    assert x0.grad is not None and x0.grad.shape == x0.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_nonfinite_values_are_counted_and_propagate(dtype):
    """NaN/Inf inside tensors never raise; they are counted per sample and reach the outputs."""
    nan, inf = float("nan"), float("inf")

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


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("weighting-bogus", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), weighting="norm")),
    ("min_norm-zero", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), min_norm=0.0)),
    ("alpha-inf", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), alpha=float("inf"))),
    ("omega-bool", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), d_uncond=tt(B, N), omega=True)),
    ("d_uncond-shape", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), d_uncond=tt(B + 1, N), omega=2.0)),
    ("dr-dtype", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), dr=tt(B, N, dtype=torch.bfloat16))),
    ("d_cond-numpy-step", lambda: K.generator_grad(f32(B, N), f32(B, N), step_slice(B, N))),
    ("out-shape", lambda: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), out=torch.empty(N, B))),
    ("out-is-x0", lambda: (lambda x: K.generator_grad(x, tt(B, N), tt(B, N), out=x))(tt(B, N))),
    ("out-is-dr", lambda: (lambda d: K.generator_grad(tt(B, N), tt(B, N), tt(B, N), dr=d, out=d))(tt(B, N))),
    ("x0-empty", lambda: K.generator_grad(torch.zeros(0, N), torch.zeros(0, N), torch.zeros(0, N))),
    ("x0-int64", lambda: K.generator_grad(torch.zeros(B, N, dtype=torch.int64), tt(B, N), tt(B, N))),
]

VALID = [
    ("cfg-reward", lambda: K.generator_grad(*(make((3, 4, 7, 9), torch.float32, s) for s in (8, 9, 10)),
                                            d_uncond=make((3, 4, 7, 9), torch.float32, 11), omega=4.5,
                                            dr=make((3, 4, 7, 9), torch.float32, 12), alpha=2.0)),
    ("unit-f16", lambda: K.generator_grad(*(make((2, 40), torch.float16, s) for s in (1, 2, 3)), weighting="unit")),
    ("cfg-bf16", lambda: K.generator_grad(*(make((4, 33), torch.bfloat16, s) for s in (4, 5, 6)),
                                                 d_uncond=make((4, 33), torch.bfloat16, 7), omega=-0.5)),
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
