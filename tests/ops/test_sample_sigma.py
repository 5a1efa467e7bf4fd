"""sample_sigma: log-normal, clamped, snapped to a table; float64 NumPy and the reference; bad input;
every backend alike."""

from __future__ import annotations

import math

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
    valid_kwargs,
    vec,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K
from diffinstruct.kernels import reference as torch_ref
from op_helpers import (
    assert_backends_agree,
    assert_deterministic,
    assert_same_error,
    calls,
)

# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("snap", [False, True])
def test_sample_sigma_lognormal_clamped_and_snapped(snap):
    table = kernels.sigma_table("iddpm_linear").astype(np.float32)
    batch, seed, offset = 4096, 31, 7
    sigma, index = kernels.sample_sigma(batch, seed, offset, p_mean=-2.0, p_std=2.0, sigma_min=0.01,
                                        sigma_max=156.6155, table=table, snap=snap)
    want, want_index = ref.sample_sigma(batch, seed, offset, -2.0, 2.0, 0.01, 156.6155, table.astype(np.float64))
    got_index = index.numpy()
    # ties between neighbours may round differently in float32; allow a neighbour there
    assert np.mean(got_index == want_index) > 0.999
    assert np.all(np.abs(got_index - want_index) <= 1)
    if snap:
        np.testing.assert_array_equal(sigma.numpy(), table[got_index])
    else:
        np.testing.assert_allclose(sigma.numpy(), want, rtol=2e-5)
    s = sigma.numpy()
    assert s.min() >= 0.01 - 1e-7 and s.max() <= 156.6155 + 1e-3
    # share of draws at the lowest level: P(ln sigma < ln edge) under N(-2, 2^2), edge = the clamp
    # (or, snapped, the midpoint between the first two table entries); 4 binomial std allowed
    edge = (table[0] + table[1]) / 2 if snap else 0.01
    expected = 0.5 * (1 + math.erf((math.log(edge) + 2.0) / (2.0 * math.sqrt(2))))
    lowest = np.mean(got_index == 0) if snap else np.mean(s <= 0.01)
    assert abs(lowest - expected) < 4 * math.sqrt(expected * (1 - expected) / batch)


def test_sample_sigma_torch_reference_agrees():
    table = kernels.sigma_table("scaled_linear").astype(np.float32)
    s_c, i_c = kernels.sample_sigma(512, 3, 0, p_mean=-1.2, p_std=1.2, sigma_min=0.0292, sigma_max=14.6146,
                                    table=table)
    s_r, i_r = torch_ref.sample_sigma(512, 3, 0, -1.2, 1.2, 0.0292, 14.6146, torch.from_numpy(table), False, "cpu")
    torch.testing.assert_close(s_c, s_r, rtol=2e-6, atol=0)
    assert (i_c == i_r).float().mean() > 0.99


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["sample_sigma"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("sample-snap-list", "sample_sigma", TE, r"^snap must be a bool, got list", lambda kw: {"snap": [1]}),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("sample_sigma", "p_mean", False),
    ("sample_sigma", "p_std", False),
    ("sample_sigma", "sigma_min", True),
    ("sample_sigma", "sigma_max", True),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
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
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
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
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- every backend alike

TABLE = [0.01, 0.05, 0.2, 0.7, 1.9, 5.0, 13.0, 40.0, 80.0]

BACKEND_CASES = [
    ("p_std-negative", lambda: K.sample_sigma(4, 1, p_std=-1.0)),
    ("p_mean-inf", lambda: K.sample_sigma(4, 1, p_mean=float("inf"))),
    ("p_mean-str", lambda: K.sample_sigma(4, 1, p_mean="0")),
    ("sigma_max-below-min", lambda: K.sample_sigma(4, 1, sigma_min=2.0, sigma_max=1.0)),
    ("sigma_max-underflow", lambda: K.sample_sigma(4, 1, sigma_min=1e-50, sigma_max=1e-50)),
    ("snap-without-table", lambda: K.sample_sigma(4, 1, snap=True)),
    ("seed-2**64", lambda: K.sample_sigma(4, 2**64)),
    ("offset-negative", lambda: K.sample_sigma(4, 1, -3)),
    ("table-nan", lambda: K.sample_sigma(4, 1, table=[0.1, float("nan"), 1.0])),
    ("table-negative", lambda: K.sample_sigma(4, 1, table=[-0.1, 0.5, 1.0])),
    ("table-repeated", lambda: K.sample_sigma(4, 1, table=[0.1, 0.5, 0.5])),
    ("table-2d", lambda: K.sample_sigma(4, 1, table=[[0.1, 0.5], [1.0, 2.0]])),
    ("table-empty", lambda: K.sample_sigma(4, 1, table=[])),
    ("numpy-table-unsorted", lambda: K.sample_sigma(4, 1, table=np.array([3.0, 1.0], np.float32), device=None)),
]

VALID = [
    ("plain", lambda: K.sample_sigma(7, 3, 2)),
    ("table", lambda: K.sample_sigma(9, 5, 1, p_mean=-1.0, table=TABLE)),
    ("snapped-numpy", lambda: K.sample_sigma(6, 8, table=np.array(TABLE, np.float32), snap=True, device=None)),
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
