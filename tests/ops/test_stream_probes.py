"""stream_copy and stream_triad, the bandwidth probes of bench/bench.py (binding only): bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core_args import (
    TE,
    VE,
    bad_input_test,
    case,
    empty,
    f32,
    float_scalar_tests,
    overlapping_pair,
    read_only,
    valid_kwargs,
)
from diffinstruct import _core

# --------------------------------------------------------------------------- correctness


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["stream_copy", "stream_triad"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
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
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("triad-scalar-str", "stream_triad", TE, r"^scalar must be a real number", lambda kw: {"scalar": "3"}),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("stream_triad", "scalar", False),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
def test_cpu_cuda_mix():
    kwargs = valid_kwargs("stream_copy")
    kwargs.update({"a": torch.zeros(16, device="cuda")})
    with pytest.raises(ValueError, match=r"b is on cpu:0 but a is on cuda:0"):
        _core.stream_copy(**kwargs)
