"""add_noise: x_t = x0 + sigma eps (and the flow form) against float64 NumPy; bad input; every backend
alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, TOLERANCES, as64
from core_args import (
    TE,
    VE,
    B,
    N,
    bad_input_test,
    case,
    empty,
    f32,
    overlapping_pair,
    read_only,
    sigma_and_output_sharing_memory,
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
@pytest.mark.parametrize("flow", [False, True])
def test_add_noise(dtype, shape, flow):
    x0 = make(shape, dtype, 1)
    sigma = sigma_for(shape[0]) / (20.0 if flow else 1.0)  # flow sigma lives in (0, 1)
    xt, eps = kernels.add_noise(x0, sigma, seed=11, offset=3, flow=flow, return_eps=True)
    want_xt, want_eps = ref.add_noise(as64(x0), sigma.double().numpy(), 11, 3, flow)
    assert xt.dtype == dtype and eps.dtype == dtype
    assert_elementwise(eps, want_eps, dtype)
    tol = TOLERANCES[dtype]
    # x_t inherits eps's float32 Box-Muller error times sigma
    atol = (tol["atol"] + 1e-5) * max(1.0, float(np.abs(want_xt).max()))
    np.testing.assert_allclose(as64(xt), want_xt, rtol=tol["rtol"], atol=atol)
    only_xt = kernels.add_noise(x0, sigma, seed=11, offset=3, flow=flow)
    torch.testing.assert_close(only_xt, xt, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["add_noise"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("noise-flow-str", "add_noise", TE, r"^flow must be a bool, got str", lambda kw: {"flow": "False"}),
    case("noise-flow-two", "add_noise", VE, r"^flow must be True or False \(or 0 or 1\)", lambda kw: {"flow": 2}),
    case("noise-flow-none", "add_noise", TE, r"^flow must be a bool, got NoneType", lambda kw: {"flow": None}),
]


test_bad_input = bad_input_test(CASES)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
def test_cpu_cuda_mix():
    kwargs = valid_kwargs("add_noise")
    kwargs.update({"xt_out": torch.zeros(B, N, device="cuda"), "eps_out": None})
    with pytest.raises(ValueError, match=r"xt_out is on cuda:0 but x0 is on cpu:0"):
        _core.add_noise(**kwargs)


# --------------------------------------------------------------------------- bad input: the public API


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
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.add_noise(tt(B, N), torch.ones(B), 1, return_eps="no"), TypeError,
                 r"^return_eps must be a bool", id="add_noise-return_eps-str"),
    pytest.param(lambda: K.add_noise(tt(B, N), torch.ones(B), 1, flow=None), TypeError, r"^flow must be a bool",
                 id="add_noise-flow-none"),
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
    xt_c = kernels.add_noise(x0, sigma, 5, 1)
    xt_r, _ = torch_ref.add_noise(x0, sigma, 5, 1, False)
    torch.testing.assert_close(xt_c, xt_r, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_requires_grad_and_low_precision(dtype):
    """Leaf tensors that require grad (and bf16/f16 tensors) are fine: the wrapper detaches them."""
    x0, d_ta, d_cond, d_uncond, sigma = grad_inputs(dtype)
    xt = K.add_noise(x0, sigma, seed=3)
    assert xt.dtype == dtype and xt.shape == x0.shape and bool(torch.isfinite(xt).all())


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("x0-float64", lambda: K.add_noise(tt(B, N, dtype=torch.float64), torch.ones(B), 1)),
    ("x0-transposed", lambda: K.add_noise(transposed(B, N), torch.ones(B), 1)),
    ("x0-empty", lambda: K.add_noise(torch.zeros(0, N), torch.ones(0), 1)),
    ("sigma-length", lambda: K.add_noise(tt(B, N), torch.ones(B + 1), 1)),
    ("sigma-2d", lambda: K.add_noise(tt(B, N), torch.ones(B, 1), 1)),
    ("sigma-float64", lambda: K.add_noise(tt(B, N), torch.ones(B, dtype=torch.float64), 1)),
    ("sigma-inf", lambda: K.add_noise(tt(B, N), torch.tensor([float("inf"), 1.0]), 1)),
    ("sigma-negative-numpy", lambda: K.add_noise(f32(B, N), vec(1.0, -2.0), 1)),
    ("out-shape", lambda: K.add_noise(tt(B, N), torch.ones(B), 1, out=torch.empty(B, N + 1))),
    ("out-dtype", lambda: K.add_noise(tt(B, N), torch.ones(B), 1, out=torch.empty(B, N, dtype=torch.float16))),
    ("out-is-x0", lambda: (lambda x: K.add_noise(x, torch.ones(B), 1, out=x))(tt(B, N))),
    ("out-read-only-numpy", lambda: K.add_noise(f32(B, N), vec(1.0, 2.0), 1, out=read_only(empty(B, N)))),
    ("out-shares-sigma", lambda: (lambda m: K.add_noise(f32(B, N), m["sigma"], 1, out=m["xt_out"]))(
        sigma_and_output_sharing_memory())),
    ("seed-huge", lambda: K.add_noise(tt(B, N), torch.ones(B), 2**64)),
    ("offset-str", lambda: K.add_noise(tt(B, N), torch.ones(B), 1, "0")),
]

VALID = [
    ("f32-eps", lambda: K.add_noise(make((3, 4, 7, 9), torch.float32, 1), sigma_for(3), 11, 3, return_eps=True)),
    ("flow-bf16", lambda: K.add_noise(make((2, 40), torch.bfloat16, 2), sigma_for(2) / 20, 4, flow=True)),
    ("numpy-f16", lambda: K.add_noise(make((B, N), torch.float16, 6).numpy(), vec(0.5, 2.0), 9, 2**40,
                                      return_eps=True)),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)
