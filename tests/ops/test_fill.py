"""fill_uniform and fill_normal (Philox): known answers, float64 NumPy, bounds per dtype; bad input;
every backend alike."""

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
    NotTensor,
    bad_input_test,
    case,
    empty,
    read_only,
    step_slice,
    transposed,
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
    assert_same_error,
    calls,
)

# --------------------------------------------------------------------------- correctness


# Random123 known-answer vectors for Philox4x32-10.
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_numpy_reference_philox_known_answers(counter, key, expected):
    out = ref.philox4x32_10(np.array([counter], dtype=np.uint64), np.array(key, dtype=np.uint64))
    assert [int(v) for v in out[0]] == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_torch_reference_philox_known_answers(counter, key, expected):
    from diffinstruct.kernels import philox

    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = philox.philox4x32_10(words, (key[0], key[1]))
    assert [int(v) for v in out] == expected


def test_kernel_uniform_bits_match_known_answer():
    # seed 0, block 0 is counter (0,0,0,0) key (0,0): its top 23 bits per lane, exactly.
    out = np.empty(4, np.float32)
    kernels.fill_uniform(out, seed=0, offset=0)
    expected = [((w >> 9) + 0.5) * 2.0**-23 for w in KAT[0][2]]
    np.testing.assert_array_equal(out.astype(np.float64), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (4099, 12345), (2**16 + 3, 2**40)])
def test_fill_uniform_and_normal_match_numpy(dtype, n, offset):
    seed = 0x1234_5678_9ABC
    u = torch.empty(n, dtype=dtype)
    z = torch.empty(n, dtype=dtype)
    kernels.fill_uniform(u, seed, offset)
    kernels.fill_normal(z, seed, offset)
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(as64(u), ref.uniform(seed, offset, n), rtol=tol["rtol"], atol=tol["atol"])
    # float32 Box-Muller: angle rounding bounds the error by ~6e-6 absolute
    atol = max(tol["atol"], 1e-5)
    np.testing.assert_allclose(as64(z), ref.normal(seed, offset, n), rtol=tol["rtol"], atol=atol)


def test_fill_is_a_stream_prefix_and_offset_shifts_by_blocks():
    long = np.empty(4000, np.float32)
    kernels.fill_normal(long, 9, 0)
    short = np.empty(1001, np.float32)
    kernels.fill_normal(short, 9, 0)
    np.testing.assert_array_equal(short, long[:1001])
    shifted = np.empty(400, np.float32)
    kernels.fill_normal(shifted, 9, 25)  # 25 blocks = 100 elements
    np.testing.assert_array_equal(shifted, long[100:500])


def test_normals_have_unit_moments():
    z = np.empty(1 << 20, np.float32)
    kernels.fill_normal(z, 2024)
    assert abs(z.mean()) < 5e-3
    assert abs(z.std() - 1.0) < 5e-3
    assert np.isfinite(z).all()


def test_torch_reference_stream_matches_c():
    a = torch.empty(1037)
    kernels.fill_normal(a, 77, 5)
    b = torch_ref.fill(torch.empty(1037), 77, 5, normal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fill_uniform_stays_inside_the_open_interval_in_every_dtype(dtype):
    """10^7 draws: a float32 draw just below 1 must not round up to 1.0 in float16/bfloat16
    (before the clamp about 2,400 and 19,600 of them did), and none may be 0."""
    n = 10**7
    u = kernels.fill_uniform(torch.empty(n, dtype=dtype), seed=2024)
    lo, hi = float(u.min()), float(u.max())
    assert lo > 0.0 and hi < 1.0, (lo, hi)
    assert hi == torch_ref.below_one(dtype)  # the top value is reached: the bound is tight, not a shift
    # the same through the binding directly, with a NumPy array (float16) and another seed
    if dtype == torch.float16:
        a = np.empty(n, np.float16)
        _core.fill_uniform(a, 99, 5)
        assert a.min() > 0 and a.max() < 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reference_uniform_has_the_same_bounds(dtype):
    """The PyTorch reference (the CUDA fallback) clamps the same way, bit for bit."""
    n = 2**18
    c = kernels.fill_uniform(torch.empty(n, dtype=dtype), seed=7)
    r = torch_ref.fill(torch.empty(n, dtype=dtype), 7, 0, normal=False)
    assert torch.equal(c, r) and float(r.max()) < 1.0


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["fill_uniform", "fill_normal"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
    # ---- fill_uniform / fill_normal
    case(
        "fill-out-float64",
        "fill_uniform",
        TE,
        r"^out: expected dtype float32, float16, bfloat16, got (numpy\.)?float64",
        lambda kw: {"out": np.zeros((B, N))},
    ),
    case(
        "fill-out-int32-numpy",
        "fill_uniform",
        TE,
        r"^out: expected dtype .* got (numpy\.)?int32",
        lambda kw: {"out": np.zeros((B, N), np.int32)},
    ),
    case(
        "fill-out-bool-numpy",
        "fill_normal",
        TE,
        r"^out: expected dtype .* got (numpy\.)?bool_?",
        lambda kw: {"out": np.zeros((B, N), bool)},
    ),
    case(
        "fill-out-int32-torch",
        "fill_normal",
        TE,
        r"^out: expected dtype .*DLPack code 0 bits 32",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.int32)},
    ),
    case(
        "fill-out-bool-torch",
        "fill_uniform",
        TE,
        r"^out: expected dtype",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.bool)},
    ),
    case(
        "fill-out-float64-torch",
        "fill_uniform",
        TE,
        r"^out: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"out": torch.zeros(B, N, dtype=torch.float64)},
    ),
    case(
        "fill-out-transposed-torch",
        "fill_normal",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": transposed(B, N)},
    ),
    case(
        "fill-out-expanded-torch",
        "fill_normal",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": torch.zeros(1, N).expand(B, N)},
    ),
    case(
        "fill-out-numpy-step",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": step_slice(B, N)},
    ),
    case(
        "fill-out-negative-stride",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": empty(B, N)[::-1]},
    ),
    case("fill-out-zero-size-numpy", "fill_uniform", VE, r"^out: is empty", lambda kw: {"out": empty(0, N)}),
    case("fill-out-zero-size-torch", "fill_normal", VE, r"^out: is empty", lambda kw: {"out": torch.zeros(B, 0)}),
    case(
        "fill-out-read-only",
        "fill_uniform",
        VE,
        r"^out: output array is read-only",
        lambda kw: {"out": read_only(empty(B, N))},
    ),
    case(
        "fill-out-byteswapped",
        "fill_uniform",
        TE,
        r"^out: expected native byte order",
        lambda kw: {"out": np.zeros((B, N), ">f4")},
    ),
    case("fill-out-None", "fill_uniform", TE, r"^out: a tensor is required, got None", lambda kw: {"out": None}),
    case(
        "fill-out-list",
        "fill_uniform",
        TE,
        r"^out: expected a NumPy array, a DLPack capsule or an object with __dlpack__",
        lambda kw: {"out": [[0.0] * N] * B},
    ),
    case(
        "fill-out-plain-object",
        "fill_normal",
        TE,
        r"^out: expected a NumPy array.* got NotTensor",
        lambda kw: {"out": NotTensor()},
    ),
    case("fill-seed-negative", "fill_uniform", VE, r"^seed must be in \[0, 2\*\*64\), got -1", lambda kw: {"seed": -1}),
    case("fill-seed-2**64", "fill_uniform", VE, r"^seed must be in \[0, 2\*\*64\)", lambda kw: {"seed": 2**64}),
    case("fill-seed-float", "fill_normal", TE, r"^seed must be an int, got float", lambda kw: {"seed": 1.0}),
    case("fill-seed-str", "fill_normal", TE, r"^seed must be an int, got str", lambda kw: {"seed": "1"}),
    case("fill-seed-bool", "fill_uniform", TE, r"^seed must be an int, got bool", lambda kw: {"seed": True}),
    case("fill-seed-numpy-float", "fill_uniform", TE, r"^seed must be an int", lambda kw: {"seed": np.float64(3)}),
    case("fill-offset-negative", "fill_normal", VE, r"^offset must be in \[0, 2\*\*64\)", lambda kw: {"offset": -5}),
    case("fill-offset-huge", "fill_uniform", VE, r"^offset must be in \[0, 2\*\*64\)", lambda kw: {"offset": 2**80}),
    case("fill-offset-None", "fill_uniform", TE, r"^offset must be an int, got NoneType", lambda kw: {"offset": None}),
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("fill-stream-negative", "fill_uniform", VE, r"^stream must be in \[0, 2\*\*64\), got -1",
         lambda kw: {"stream": -1}),
    case("fill-stream-str", "fill_normal", TE, r"^stream must be an int, got str", lambda kw: {"stream": "0"}),
]


test_bad_input = bad_input_test(CASES)


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.fill_uniform(torch.zeros(B, N, dtype=torch.int32), 1),
        TypeError,
        r"^out: expected dtype",
        id="fill_uniform-int32",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.fill_uniform([0.0] * 4, 1), TypeError, r"^out: expected a torch.Tensor", id="fill-list"),
    pytest.param(lambda: K.fill_uniform(torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8), 1),
                 BufferError, r"^out: cannot be passed through DLPack", id="fill-quantized",
                 marks=pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_wrapper_accepts_low_precision(dtype):
    """bf16/f16 outputs are fine."""
    noise = K.fill_normal(torch.empty(B, N, dtype=dtype), 9)
    assert bool(torch.isfinite(noise).all())


# --------------------------------------------------------------------------- every backend alike

BACKEND_CASES = [
    ("uniform-float64", lambda: K.fill_uniform(torch.zeros(B, N, dtype=torch.float64), 1)),
    ("normal-int32-numpy", lambda: K.fill_normal(np.zeros((B, N), np.int32), 1)),
    ("uniform-bool", lambda: K.fill_uniform(torch.zeros(3, dtype=torch.bool), 1)),
    ("normal-complex", lambda: K.fill_normal(torch.zeros(3, dtype=torch.complex64), 1)),
    ("uniform-transposed", lambda: K.fill_uniform(transposed(B, N), 1)),
    ("normal-numpy-step", lambda: K.fill_normal(step_slice(B, N), 1)),
    ("normal-read-only-numpy", lambda: K.fill_normal(read_only(empty(B, N)), 1)),
    ("uniform-empty", lambda: K.fill_uniform(torch.zeros(0, N), 1)),
    ("uniform-17-dims", lambda: K.fill_uniform(torch.zeros((1,) * 17), 1)),
    ("normal-seed-negative", lambda: K.fill_normal(torch.zeros(3), -1)),
    ("uniform-offset-2**64", lambda: K.fill_uniform(torch.zeros(3), 1, 2**64)),
    ("normal-seed-float", lambda: K.fill_normal(torch.zeros(3), 1.0)),
    ("uniform-seed-bool", lambda: K.fill_uniform(torch.zeros(3), True)),
    ("normal-neg-view", lambda: K.fill_normal(torch._neg_view(torch.zeros(3)), 1)),
]

VALID = [
    ("uniform-f32", lambda: K.fill_uniform(torch.empty(5, 7), 3, 2)),
    ("normal-bf16", lambda: K.fill_normal(torch.empty(4, 33, dtype=torch.bfloat16), 9, 2**40)),
    ("uniform-f16-numpy", lambda: K.fill_uniform(np.empty(1001, np.float16), 2**63 + 5)),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call, rtol=0, atol=1e-6)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)
