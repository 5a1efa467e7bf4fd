"""precond: EDM / eps / v preconditioning coefficients against float64 NumPy; bad input; C only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from core_args import (
    TE,
    VE,
    B,
    bad_input_test,
    case,
    empty,
    float_scalar_tests,
    read_only,
    valid_kwargs,
    vec,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K
from op_helpers import (
    LOW_PRECISION,
    LOW_PRECISION_IDS,
    grad_inputs,
)

# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ["edm", "eps", "v"])
def test_precond_coefficients(kind):
    sigma = np.array([0.01, 0.135, 1.0, 2.5, 80.0], np.float32)
    out = kernels.precond(sigma, kind=kind, sigma_data=0.5)
    s = sigma.astype(np.float64)
    if kind == "edm":
        sd = 0.5
        want = {"c_skip": sd**2 / (s**2 + sd**2), "c_out": s * sd / np.sqrt(s**2 + sd**2),
                "c_in": 1 / np.sqrt(s**2 + sd**2), "c_noise": np.log(s) / 4, "weight": ref.edm_lambda(s, sd)}
    else:
        v = kind == "v"
        want = {"c_skip": 1 / (s**2 + 1) if v else np.ones_like(s),
                "c_out": -s / np.sqrt(s**2 + 1) if v else -s, "c_in": 1 / np.sqrt(s**2 + 1), "c_noise": s,
                "weight": ref.edm_lambda(s, 1.0)}
    for key, value in want.items():
        np.testing.assert_allclose(out[key], value, rtol=2e-6, err_msg=key)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["precond"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("precond-kind-none", "precond", TE, r"^kind must be a str", lambda kw: {"kind": None}),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("precond", "sigma_data", True),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
def test_cpu_cuda_mix():
    kwargs = valid_kwargs("precond")
    kwargs.update({k: torch.zeros(B, device="cuda") for k in ("c_skip", "c_out", "c_in", "c_noise", "weight")})
    with pytest.raises(ValueError, match=r"c_skip is on cuda:0 but sigma is on cpu:0"):
        _core.precond(**kwargs)


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.precond(torch.tensor([0.5, -1.0])),
        ValueError,
        r"^sigma\[1\] must be finite and > 0",
        id="precond-negative-sigma",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.precond("abc"), TypeError, r"^sigma: expected a tensor or a sequence", id="precond-str"),
    pytest.param(lambda: K.precond(None), TypeError, r"^sigma: a tensor is required", id="precond-none"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_requires_grad(dtype):
    """A sigma that requires grad is fine: the wrapper detaches it."""
    *_, sigma = grad_inputs(dtype)
    pre = K.precond(sigma)
    assert set(pre) == {"c_skip", "c_out", "c_in", "c_noise", "weight"}


def test_only_the_c_extension_runs_it():
    """A host-side computation: no other backend has it, so forcing one leaves it on the C extension."""
    assert kernels.backends()["precond"]["reference"] is not None
    assert kernels.backends()["precond"]["cuda"] is not None
    want = kernels.precond(torch.tensor([0.5, 2.0]))
    with kernels.use_backend("reference"):
        got = kernels.precond(torch.tensor([0.5, 2.0]))
    assert all(torch.equal(got[k], want[k]) for k in want)
