"""stream_copy and stream_triad, the bandwidth probes of bench/bench.py (binding only): bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core_args import (
    TE,
    VE,
    Case,
    case,
    empty,
    f32,
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


@pytest.mark.parametrize("c", CASES)
def test_bad_input(c: Case):
    kwargs = valid_kwargs(c.fn)
    kwargs.update(c.make(kwargs))
    with pytest.raises(c.exc, match=c.match):
        getattr(_core, c.fn)(**kwargs)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
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


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CPU/CUDA mix needs a CUDA device (torch.cuda.is_available() is False on this machine)",
)
def test_cpu_cuda_mix():
    kwargs = valid_kwargs("stream_copy")
    kwargs.update({"a": torch.zeros(16, device="cuda")})
    with pytest.raises(ValueError, match=r"b is on cpu:0 but a is on cuda:0"):
        _core.stream_copy(**kwargs)
