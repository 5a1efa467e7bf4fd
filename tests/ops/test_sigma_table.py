"""sigma_table: the iDDPM and scaled-linear schedules against float64 NumPy; bad input; C only."""

from __future__ import annotations

import numpy as np
import pytest

import reference_np as ref
from core_args import (
    TE,
    VE,
    bad_input_test,
    case,
    float_scalar_tests,
    valid_kwargs,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K

# --------------------------------------------------------------------------- correctness


def test_sigma_tables_match_numpy_and_paper_ranges():
    pix = kernels.sigma_table("iddpm_linear")
    np.testing.assert_allclose(pix, ref.iddpm_linear_table(), rtol=1e-12)
    assert round(pix[0], 4) == 0.0100 and round(pix[-1], 4) == 156.6155
    sd = kernels.sigma_table("scaled_linear")
    np.testing.assert_allclose(sd, ref.scaled_linear_table(), rtol=1e-12)
    assert round(sd[0], 4) == 0.0292 and round(sd[-1], 4) == 14.6146
    assert round(sd[625], 4) == 2.5017
    assert np.all(np.diff(pix) > 0) and np.all(np.diff(sd) > 0)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["sigma_table"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
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
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("sigma_table", "beta_start", False),
    ("sigma_table", "beta_end", False),
    ("sigma_table", "clip", False),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.sigma_table("scaled_linear", 10, beta_end=-0.012),
        ValueError,
        r"^beta_end must be in",
        id="sigma_table-negative-beta",
    ),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_only_the_c_extension_runs_it():
    """A host-side computation: no other backend has it, so forcing one leaves it on the C extension."""
    assert kernels.backends()["sigma_table"]["reference"] is not None
    assert kernels.backends()["sigma_table"]["cuda"] is not None
    want = kernels.sigma_table("scaled_linear", 50)
    with kernels.use_backend("reference"):
        got = kernels.sigma_table("scaled_linear", 50)
    np.testing.assert_array_equal(got, want)
