"""ema_update: the multi-tensor EMA against float64 NumPy and the reference; bad input; every backend alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    float_scalar_tests,
    read_only,
    transposed,
    tt,
    valid_kwargs,
)
from diffinstruct import _core, kernels
from diffinstruct import kernels as K
from diffinstruct.kernels import reference
from op_helpers import (
    assert_backends_agree,
    assert_deterministic,
    assert_same_error,
    calls,
    tensors,
)

# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ema_dtype", [torch.float32, None])
def test_ema_update(dtype, ema_dtype):
    params = tensors(dtype, 1)
    ema = [t.to(ema_dtype or dtype) for t in tensors(dtype, 2)]
    before = [as64(e) for e in ema]
    kernels.ema_update(ema, params, 0.95)
    for e, b, p in zip(ema, before, params, strict=True):
        tol = TOLERANCES[e.dtype]
        np.testing.assert_allclose(as64(e), 0.95 * b + 0.05 * as64(p), rtol=tol["rtol"], atol=tol["atol"])


def test_torch_reference_matches_c_optimizers():
    """The PyTorch reference (the CUDA fallback) agrees with the C multi-tensor kernels."""

    params_c = tensors(torch.float32, 30)
    params_r = [p.clone() for p in params_c]
    grads = tensors(torch.float32, 31)
    ema_c, ema_r = [g.clone() for g in grads], [g.clone() for g in grads]
    kernels.ema_update(ema_c, params_c, 0.95)
    reference.ema_update(ema_r, params_r, 0.95)
    for a, b in zip(ema_c, ema_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["ema_update"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
    # ---- ema_update
    case("ema-decay-above-1", "ema_update", VE, r"^decay must be in \[0, 1\], got 1.5", lambda kw: {"decay": 1.5}),
    case("ema-decay-negative", "ema_update", VE, r"^decay must be in \[0, 1\]", lambda kw: {"decay": -0.1}),
    case("ema-decay-nan", "ema_update", VE, r"^decay must be in \[0, 1\], got nan", lambda kw: {"decay": float("nan")}),
    case(
        "ema-ema-not-list",
        "ema_update",
        TE,
        r"^ema must be a list or tuple of tensors, got numpy.ndarray",
        lambda kw: {"ema": f32(2, 3)},
    ),
    case(
        "ema-params-not-list",
        "ema_update",
        TE,
        r"^params must be a list or tuple of tensors, got dict",
        lambda kw: {"params": {}},
    ),
    case(
        "ema-empty-lists", "ema_update", VE, r"^ema: the list of tensors is empty", lambda kw: {"ema": [], "params": []}
    ),
    case(
        "ema-length-mismatch",
        "ema_update",
        VE,
        r"^params has 1 tensors but ema has 2",
        lambda kw: {"params": kw["params"][:1]},
    ),
    case(
        "ema-item-float64",
        "ema_update",
        TE,
        r"^ema\[1\]: expected dtype .* got (numpy\.)?float64",
        lambda kw: {"ema": [kw["ema"][0], np.zeros(5)]},
    ),
    case(
        "ema-item-shape",
        "ema_update",
        VE,
        r"^params\[0\] has shape \(3, 2\) but ema\[0\] has shape \(2, 3\)",
        lambda kw: {"params": [f32(3, 2), kw["params"][1]]},
    ),
    case(
        "ema-item-is-param",
        "ema_update",
        VE,
        r"^ema\[0\] overlaps params\[0\]",
        lambda kw: {"params": [kw["ema"][0], kw["params"][1]]},
    ),
    case(
        "ema-item-read-only",
        "ema_update",
        VE,
        r"^ema\[0\]: output array is read-only",
        lambda kw: {"ema": [read_only(f32(2, 3)), kw["ema"][1]]},
    ),
    case(
        "ema-item-twice",
        "ema_update",
        VE,
        r"ema\[1\] overlaps ema\[0\]|ema\[0\] overlaps ema\[1\]",
        lambda kw: (lambda e: {"ema": [e, e], "params": [f32(5), f32(5)]})(f32(5)),
    ),
    case(
        "ema-item-string",
        "ema_update",
        TE,
        r"^ema\[0\]: expected a NumPy array.* got str",
        lambda kw: {"ema": ["w", kw["ema"][1]]},
    ),
    case(
        "ema-item-zero-size",
        "ema_update",
        VE,
        r"^ema\[1\]: is empty",
        lambda kw: {"ema": [kw["ema"][0], empty(0)], "params": [kw["params"][0], empty(0)]},
    ),
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("ema-decay-none", "ema_update", TE, r"^decay must be a real number, got NoneType", lambda kw: {"decay": None}),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("ema_update", "decay", False),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.ema_update([tt(3)], [tt(3), tt(3)], 0.9),
        ValueError,
        r"^params has 2 tensors but ema has 1",
        id="ema_update-lengths",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.ema_update(None, [tt(3)], 0.5), TypeError, r"^ema must be a list or tuple of tensors",
                 id="ema_update-none"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- every backend alike


def _ema(dtype):
    ema = [t.to(torch.float32) for t in tensors(dtype, 2)]
    kernels.ema_update(ema, tensors(dtype, 1), 0.95)
    return ema


def _adam(dtype, moments, decoupled):
    params = tensors(dtype, 3)
    m = [torch.zeros(p.shape) for p in params] if moments else None
    v = [torch.zeros(p.shape) for p in params]
    for step in (1, 2):
        kernels.adam_step(params, tensors(dtype, 10 + step), m, v, lr=1e-2, beta1=0.9 if moments else 0.0,
                          weight_decay=0.01, step=step, decoupled=decoupled)
    return params, m, v


BACKEND_CASES = [
    ("empty", lambda: K.ema_update([], [], 0.9)),
    ("item-shape", lambda: K.ema_update([tt(3)], [tt(4)], 0.9)),
    ("item-float64", lambda: K.ema_update([tt(3)], [tt(3, dtype=torch.float64)], 0.9)),
    ("item-numpy-read-only", lambda: K.ema_update([read_only(f32(3))], [f32(3)], 0.9)),
    ("item-transposed", lambda: K.ema_update([torch.zeros(B, N)], [transposed(B, N)], 0.9)),
    ("item-empty", lambda: K.ema_update([torch.zeros(0)], [torch.zeros(0)], 0.9)),
    ("decay-above-one", lambda: K.ema_update([tt(3)], [tt(3)], 1.5)),
    ("decay-nan", lambda: K.ema_update([tt(3)], [tt(3)], float("nan"))),
    ("decay-bool", lambda: K.ema_update([tt(3)], [tt(3)], True)),
    ("ema-twice", lambda: (lambda e: K.ema_update([e, e], [tt(3), tt(3)], 0.9))(tt(3))),
    ("ema-is-param", lambda: (lambda e: K.ema_update([e], [e], 0.9))(tt(3))),
    ("ema-tuple-neg-view", lambda: K.ema_update((torch._neg_view(tt(3)),), (tt(3),), 0.9)),
]

VALID = [
    ("f32", lambda: _ema(torch.float32)),
    ("bf16-params", lambda: _ema(torch.bfloat16)),
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


# --------------------------------------------------------------------------- mixed lists

MIXED_SIZES = (1, 3, 1023, 1024, 1025, 70_000, 5, 2048)  # tiny and large tensors in one call, across chunk edges


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ema_update_mixed_sizes(dtype):
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(n, generator=gen).to(dtype) for n in MIXED_SIZES]
    ema = [torch.randn(n, generator=gen).to(dtype) for n in MIXED_SIZES]
    before = [as64(e) for e in ema]
    kernels.ema_update(ema, params, 0.95)
    tol = TOLERANCES[dtype]
    for e, b, p in zip(ema, before, params, strict=True):
        np.testing.assert_allclose(as64(e), 0.95 * b + 0.05 * as64(p), rtol=tol["rtol"], atol=tol["atol"])


def test_ema_update_list_mixing_plain_and_other_tensors():
    """Plain CPU tensors take the list's direct DLPack path; one requiring grad or lazily negated, in the same
    list, still takes plain()'s (detached, resolved), with the same results."""
    gen = torch.Generator().manual_seed(12)
    base = [torch.randn(n, generator=gen) for n in (4, 1500, 7)]
    params = [base[0], base[1].clone().requires_grad_(True), torch._neg_view(base[2])]
    ema = [torch.randn(t.shape, generator=gen) for t in base]
    want = [0.9 * as64(e) + 0.1 * as64(p.detach().resolve_neg()) for e, p in zip(ema, params, strict=True)]
    kernels.ema_update(ema, params, 0.9)
    for e, w in zip(ema, want, strict=True):
        np.testing.assert_allclose(as64(e), w, rtol=1e-6, atol=1e-7)


def test_ema_update_lazily_negated_output_in_a_list_is_named():
    ema = [torch.zeros(4), torch._neg_view(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"ema\[1\]: a lazily negated"):
        kernels.ema_update(ema, [torch.ones(4), torch.ones(4)], 0.9)


def test_ema_update_bad_item_after_plain_ones_is_named():
    ema = [torch.zeros(4), torch.zeros(4), torch.zeros(2, 2).t()]
    with pytest.raises(ValueError, match=r"ema\[2\]"):
        kernels.ema_update(ema, [torch.ones(4), torch.ones(4), torch.ones(2, 2)], 0.9)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        kernels.ema_update(ema[:2], [torch.ones(4), None], 0.9)


# --------------------------------------------------------------------------- the fast list path

FAST = kernels.ops._FAST


def _pairs(n: int = 3, size: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(21)
    return [torch.randn(size, generator=gen) for _ in range(n)], [torch.randn(size, generator=gen) for _ in range(n)]


def test_fast_path_runs_plain_lists_bit_for_bit():
    """Plain tensors, Parameters requiring grad, tuples and NumPy arrays run on the entry's fast path (None),
    with the same bits as the checked path."""
    ema, params = _pairs()
    params[1] = torch.nn.Parameter(params[1])
    want = [e.clone() for e in ema]
    _core.ema_update([w.numpy() for w in want], [p.detach().numpy() for p in params], 0.9)
    assert _core.ema_update(tuple(ema), params, 0.9, fast=FAST) is None
    assert all(torch.equal(e, w) for e, w in zip(ema, want, strict=True))
    arrays = [w.numpy().copy() for w in want]
    assert _core.ema_update(arrays, [p.detach().numpy() for p in params], 0.9, fast=FAST) is None
    _core.ema_update(ema, params, 0.9, fast=(None, FAST[1], FAST[2], ()))  # torch's to_dlpack for every item
    assert all(np.array_equal(a, e.numpy()) for a, e in zip(arrays, ema, strict=True))


class _Sub(torch.Tensor):
    pass


def test_fast_path_takes_tensor_subclasses_through_to_dlpack():
    ema, params = _pairs()
    want = [e.clone() for e in ema]
    kernels.ema_update(want, params, 0.5)
    assert _core.ema_update(ema, [p.as_subclass(_Sub) for p in params], 0.5, fast=FAST) is None
    assert all(torch.equal(e, w) for e, w in zip(ema, want, strict=True))


def _handed_back() -> list[tuple[str, object, object, object]]:
    ema, params = _pairs()
    base = torch.zeros(12)
    return [
        ("negated input", ema, [params[0], torch._neg_view(params[1]), params[2]], 0.9),
        ("negated output", [ema[0], torch._neg_view(ema[1]), ema[2]], params, 0.9),
        ("transposed", [ema[0], ema[1], torch.zeros(3, 2).t()], [params[0], params[1], torch.zeros(2, 3)], 0.9),
        ("same numel, other shape", [ema[0], ema[1], torch.zeros(2, 3)], [params[0], params[1], torch.zeros(3, 2)],
         0.9),
        ("overlapping outputs", [base[:6], base[3:9]], params[:2], 0.9),
        ("output overlaps an input", [base[:6], ema[1]], [base[2:8], params[1]], 0.9),
        ("float64", [ema[0].double()], [params[0].double()], 0.9),
        ("empty tensor", [torch.zeros(0)], [torch.zeros(0)], 0.9),
        ("empty lists", [], [], 0.9),
        ("lengths", ema, params[:2], 0.9),
        ("not a list", ema[0], params, 0.9),
        ("None item", ema[:2], [params[0], None], 0.9),
        ("decay", ema, params, 1.5),
        ("decay type", ema, params, "0.9"),
        ("meta", [torch.zeros(6, device="meta")], [torch.zeros(6, device="meta")], 0.9),
        ("sparse", [ema[0].to_sparse()], [params[0].to_sparse()], 0.9),
    ]


@pytest.mark.parametrize("what,ema,params,decay", _handed_back(), ids=[c[0] for c in _handed_back()])
def test_fast_path_hands_back_what_it_cannot_take_untouched(what, ema, params, decay):
    """Anything but plain lists: NotImplemented, nothing written (the Python layer's checked path then raises
    its own error, naming the item)."""
    before = [e.clone() for e in ema] if isinstance(ema, list) else None
    assert _core.ema_update(ema, params, decay, fast=FAST) is NotImplemented
    if before is not None:
        assert all(e.is_meta or e.is_sparse or torch.equal(e, b) for e, b in zip(ema, before, strict=True))


def test_checked_path_names_what_the_fast_path_handed_back():
    ema, params = _pairs(2)
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(3, 2\) but ema\[1\] has shape \(2, 3\)"):
        kernels.ema_update([ema[0], torch.zeros(2, 3)], [params[0], torch.zeros(3, 2)], 0.9)
    base = torch.zeros(12)
    with pytest.raises(ValueError, match=r"overlaps .* in memory"):
        kernels.ema_update([base[:6], base[3:9]], params, 0.9)


@pytest.mark.parametrize("fast", [(1, 2), (None, len, len), (None, len, len, [torch.Tensor]), (None, 1, len, ())])
def test_fast_argument_is_checked(fast):
    ema, params = _pairs()
    with pytest.raises(TypeError, match=r"fast must be a tuple \(exchange_api, export_fn, is_neg, types\)"):
        _core.ema_update(ema, params, 0.9, fast=fast)
