"""adam_step: multi-tensor Adam/AdamW against float64 NumPy and torch.optim; bad input; every backend
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
    bad_input_test,
    case,
    empty,
    f32,
    float_scalar_tests,
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
# every (weight-decay mode, lerp form) pair: the CPU loop is specialised per pair
@pytest.mark.parametrize("beta1,weight_decay,decoupled", [(0.0, 0.0, False), (0.9, 0.0, False), (0.0, 0.01, False),
                                                          (0.9, 0.01, False), (0.0, 0.1, True), (0.9, 0.1, True)])
def test_adam_step_matches_numpy_over_steps(dtype, beta1, weight_decay, decoupled):
    params = tensors(dtype, 3)
    m = [torch.zeros(p.shape) for p in params]
    v = [torch.zeros(p.shape) for p in params]
    want = [(as64(p), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
    for step in range(1, 4):
        grads = tensors(dtype, 10 + step)
        kernels.adam_step(params, grads, m, v, lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8,
                          weight_decay=weight_decay, step=step, decoupled=decoupled)
        want = [ref.adam(p, as64(g), mm, vv, 1e-2, beta1, 0.999, 1e-8, weight_decay, step, decoupled)
                for (p, mm, vv), g in zip(want, grads, strict=True)]
        # round the reference parameters to the kernel's dtype, as the kernel stores them
        want = [(as64(torch.from_numpy(p).to(dtype)), mm, vv) for p, mm, vv in want]
    tol = TOLERANCES[dtype]
    for p, mm, vv, (wp, wm, wv) in zip(params, m, v, want, strict=True):
        np.testing.assert_allclose(as64(p), wp, rtol=tol["rtol"], atol=max(tol["atol"], 1e-5))
        np.testing.assert_allclose(mm.numpy(), wm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(vv.numpy(), wv, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.01, False), (0.1, True)])
def test_adam_without_first_moment_equals_beta1_zero(dtype, weight_decay, decoupled):
    """exp_avgs=None (beta1 = 0): the same parameters and second moments as keeping m, to the bit;
    the pure-PyTorch reference's None path agrees within the dtype's tolerance."""
    with_m, without_m, by_reference = tensors(dtype, 5), tensors(dtype, 5), tensors(dtype, 5)
    m = [torch.zeros(p.shape) for p in with_m]
    v1, v2, v3 = ([torch.zeros(p.shape) for p in with_m] for _ in range(3))
    for step in range(1, 4):
        grads = tensors(dtype, 20 + step)
        opts = {"lr": 1e-2, "beta1": 0.0, "beta2": 0.999, "eps": 1e-8, "weight_decay": weight_decay,
                "step": step, "decoupled": decoupled}
        kernels.adam_step(with_m, grads, m, v1, **opts)
        kernels.adam_step(without_m, grads, None, v2, **opts)
        reference.adam_step(by_reference, grads, None, v3, **opts)
    tol = TOLERANCES[dtype]
    for a, b, c, va, vb, vc in zip(with_m, without_m, by_reference, v1, v2, v3, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(va, vb)
        np.testing.assert_allclose(as64(c), as64(b), rtol=tol["rtol"], atol=max(tol["atol"], 1e-5))
        np.testing.assert_allclose(vc.numpy(), vb.numpy(), rtol=1e-5, atol=1e-9)


def test_fused_adam_keeps_no_first_moment_at_beta1_zero():
    from diffinstruct.optim import FusedAdam

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = FusedAdam([p], lr=0.1, betas=(0.0, 0.999))
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg_sq"}
    opt.param_groups[0]["betas"] = (0.9, 0.999)  # a resume with momentum starts m at zero
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((4,), 0.1))


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_step_matches_torch_optim(decoupled):
    params = [torch.nn.Parameter(t) for t in tensors(torch.float32, 4)]
    mine = [p.detach().clone() for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(params, lr=5e-3, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.05)
    m = [torch.zeros_like(p) for p in mine]
    v = [torch.zeros_like(p) for p in mine]
    for step in range(1, 6):
        grads = tensors(torch.float32, 20 + step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        kernels.adam_step(mine, grads, m, v, lr=5e-3, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.05,
                          step=step, decoupled=decoupled)
    for p, q in zip(params, mine, strict=True):
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


def test_adam_beta1_zero_keeps_no_momentum():
    p = [torch.zeros(10)]
    m = [torch.full((10,), 123.0)]
    v = [torch.zeros(10)]
    g = [torch.arange(10.0)]
    kernels.adam_step(p, g, m, v, lr=1.0, beta1=0.0, beta2=0.999, eps=1e-8, step=1)
    assert torch.equal(m[0], g[0])  # exact: no leftover of the old moment


def test_torch_reference_matches_c_optimizers():
    """The PyTorch reference (the CUDA fallback) agrees with the C multi-tensor kernels."""
    from diffinstruct.kernels import reference

    params_c = tensors(torch.float32, 30)
    params_r = [p.clone() for p in params_c]
    grads = tensors(torch.float32, 31)
    m_c, v_c = [torch.zeros(p.shape) for p in params_c], [torch.zeros(p.shape) for p in params_c]
    m_r, v_r = [m.clone() for m in m_c], [v.clone() for v in v_c]
    for step in (1, 2, 3):
        kernels.adam_step(params_c, grads, m_c, v_c, lr=1e-2, beta1=0.9, weight_decay=0.01, step=step, decoupled=True)
        reference.adam_step(params_r, grads, m_r, v_r, 1e-2, 0.9, 0.999, 1e-8, 0.01, step, True)
    for a, b in zip(params_c + m_c + v_c, params_r + m_r + v_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- bad input: the binding

FNS = ["adam_step"]


@pytest.mark.parametrize("fn", FNS)
def test_valid_baseline(fn):
    """The starting point of every bad-input case runs without error."""
    getattr(_core, fn)(**valid_kwargs(fn))


CASES = [
    # ---- adam_step
    case("adam-beta1-one", "adam_step", VE, r"^beta1 must be in \[0, 1\), got 1", lambda kw: {"beta1": 1.0}),
    case("adam-beta1-negative", "adam_step", VE, r"^beta1 must be in \[0, 1\)", lambda kw: {"beta1": -0.1}),
    case("adam-beta2-one", "adam_step", VE, r"^beta2 must be in \[0, 1\), got 1", lambda kw: {"beta2": 1.0}),
    case("adam-beta2-nan", "adam_step", VE, r"^beta2 must be in", lambda kw: {"beta2": float("nan")}),
    case("adam-eps-zero", "adam_step", VE, r"^eps must be a finite number > 0, got 0", lambda kw: {"eps": 0.0}),
    case("adam-eps-negative", "adam_step", VE, r"^eps must be a finite number > 0", lambda kw: {"eps": -1e-8}),
    case("adam-lr-negative", "adam_step", VE, r"^lr must be in \[0, 1e\+06\], got -0.1", lambda kw: {"lr": -0.1}),
    case("adam-lr-nan", "adam_step", VE, r"^lr must be in", lambda kw: {"lr": float("nan")}),
    case("adam-weight_decay-negative", "adam_step", VE, r"^weight_decay must be in", lambda kw: {"weight_decay": -1.0}),
    case("adam-step-zero", "adam_step", VE, r"^step must be >= 1, got 0", lambda kw: {"step": 0}),
    case("adam-step-negative", "adam_step", VE, r"^step must be >= 1", lambda kw: {"step": -3}),
    case(
        "adam-grads-length",
        "adam_step",
        VE,
        r"^grads has 1 tensors but params has 2",
        lambda kw: {"grads": kw["grads"][:1]},
    ),
    case(
        "adam-exp_avg_sqs-length",
        "adam_step",
        VE,
        r"^exp_avg_sqs has 3 tensors but params has 2",
        lambda kw: {"exp_avg_sqs": [*kw["exp_avg_sqs"], empty(1)]},
    ),
    case(
        "adam-empty-lists",
        "adam_step",
        VE,
        r"^params: the list of tensors is empty",
        lambda kw: {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": []},
    ),
    case(
        "adam-params-not-list",
        "adam_step",
        TE,
        r"^params must be a list or tuple of tensors, got numpy.ndarray",
        lambda kw: {"params": f32(5)},
    ),
    case(
        "adam-grads-generator",
        "adam_step",
        TE,
        r"^grads must be a list or tuple of tensors, got generator",
        lambda kw: {"grads": (g for g in kw["grads"])},
    ),
    case(
        "adam-exp_avgs-float16",
        "adam_step",
        TE,
        r"^exp_avgs\[0\]: expected dtype float32, got (numpy\.)?float16",
        lambda kw: {"exp_avgs": [empty(2, 3, dtype=np.float16), kw["exp_avgs"][1]]},
    ),
    case(
        "adam-exp_avg_sqs-shape",
        "adam_step",
        VE,
        r"^exp_avg_sqs\[1\] has shape \(4,\) but params\[1\] has shape \(5,\)",
        lambda kw: {"exp_avg_sqs": [kw["exp_avg_sqs"][0], empty(4)]},
    ),
    case(
        "adam-grad-is-param",
        "adam_step",
        VE,
        r"^params\[0\] overlaps grads\[0\]",
        lambda kw: {"grads": [kw["params"][0], kw["grads"][1]]},
    ),
    case(
        "adam-exp_avg-is-exp_avg_sq",
        "adam_step",
        VE,
        r"exp_avg_sqs\[0\] overlaps exp_avgs\[0\]|exp_avgs\[0\] overlaps exp_avg_sqs\[0\]",
        lambda kw: {"exp_avg_sqs": [kw["exp_avgs"][0], kw["exp_avg_sqs"][1]]},
    ),
    case(
        "adam-exp_avgs-none-with-momentum",
        "adam_step",
        VE,
        r"^exp_avgs may be None only when beta1 == 0 \(got beta1 = 0.9\)",
        lambda kw: {"exp_avgs": None},
    ),
    case(
        "adam-exp_avgs-none-bad-exp_avg_sqs-shape",
        "adam_step",
        VE,
        r"^exp_avg_sqs\[1\] has shape \(4,\) but params\[1\] has shape \(5,\)",
        lambda kw: {"exp_avgs": None, "beta1": 0.0, "exp_avg_sqs": [kw["exp_avg_sqs"][0], empty(4)]},
    ),
    case(
        "adam-grads-int32",
        "adam_step",
        TE,
        r"^grads\[1\]: expected dtype .* got (numpy\.)?int32",
        lambda kw: {"grads": [kw["grads"][0], np.zeros(5, np.int32)]},
    ),
    case(
        "adam-params-transposed-torch",
        "adam_step",
        VE,
        r"^params\[0\]: expected a C-contiguous",
        lambda kw: {"params": [transposed(2, 3), kw["params"][1]]},
    ),
    case(
        "adam-params-item-None",
        "adam_step",
        TE,
        r"^params\[1\]: a tensor is required, got None",
        lambda kw: {"params": [kw["params"][0], None]},
    ),
    # ---- scalar parsing: every conversion error names the argument (issue 10, item 6)
    case("adam-decoupled-str", "adam_step", TE, r"^decoupled must be a bool", lambda kw: {"decoupled": "yes"}),
    case(
        "adam-step-huge",
        "adam_step",
        VE,
        r"^step must be in \[1, 2\*\*63\), got an int >= 2\*\*63",
        lambda kw: {"step": 2**70},
    ),
    case("adam-step-float", "adam_step", TE, r"^step must be an int, got float", lambda kw: {"step": 1.0}),
    case("adam-lr-str", "adam_step", TE, r"^lr must be a real number, got str", lambda kw: {"lr": "1e-3"}),
]


test_bad_input = bad_input_test(CASES)


# Every float scalar argument of this file's entry points, and whether 0 is invalid for it (then a
# value that underflows to 0 in float32 must be rejected too). The kernels take them as float32.
FLOAT_SCALARS = [
    ("adam_step", "lr", False),
    ("adam_step", "beta1", False),
    ("adam_step", "beta2", False),
    ("adam_step", "eps", True),
    ("adam_step", "weight_decay", False),
]


test_float_scalars_beyond_float32_are_rejected, test_float_scalars_underflowing_float32 = (
    float_scalar_tests(FLOAT_SCALARS))


# --------------------------------------------------------------------------- bad input: the public API


WRAPPER_CASES = [
    pytest.param(
        lambda: K.adam_step([tt(4)], [tt(4)], [torch.zeros(4)], [torch.zeros(4)], lr=1e-3, beta1=1.0, step=1),
        ValueError,
        r"^beta1 must be in \[0, 1\)",
        id="adam_step-beta1-one",
    ),
    pytest.param(
        lambda: K.adam_step([tt(4)], [tt(4)], [torch.zeros(4)], [torch.zeros(4)], lr=1e-3, step=0),
        ValueError,
        r"^step must be >= 1",
        id="adam_step-step-zero",
    ),
    pytest.param(
        lambda: K.adam_step(
            [tt(4)], [tt(4)], [torch.zeros(4, dtype=torch.bfloat16)], [torch.zeros(4)], lr=1e-3, step=1
        ),
        TypeError,
        r"^exp_avgs\[0\]: expected dtype float32",
        id="adam_step-bf16-state",
    ),
    # ---- every rejection names the argument (issue 10, item 6): before, raw AttributeError/torch errors
    pytest.param(lambda: K.adam_step([tt(4)], [None], None, [torch.zeros(4)], lr=1e-3, step=1), TypeError,
                 r"^grads\[0\]: a tensor is required, got None", id="adam_step-grad-none"),
    pytest.param(lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, step=1, decoupled="1"),
                 TypeError, r"^decoupled must be a bool", id="adam_step-decoupled-str"),
]


@pytest.mark.parametrize("call,exc,match", WRAPPER_CASES)
def test_wrapper_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_optimizer_wrappers_accept_parameters(dtype):
    """nn.Parameter (requires_grad=True) params are updated in place without autograd errors."""
    p = torch.nn.Parameter(tt(3, 4, dtype=dtype))
    before = p.detach().clone()
    grad = tt(3, 4, dtype=dtype)
    m, v = torch.zeros(3, 4), torch.zeros(3, 4)
    K.adam_step([p], [grad], [m], [v], lr=1e-2, beta1=0.9, step=1)
    assert p.requires_grad and not torch.equal(p.detach(), before)
    ema = tt(3, 4, dtype=dtype)
    ema_before = ema.clone()
    K.ema_update([ema], [p], 0.5)
    assert not torch.equal(ema, ema_before)


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
    ("no-moments-with-beta1", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, beta1=0.9,
                                                  step=1)),
    ("lengths", lambda: K.adam_step([tt(4)], [tt(4), tt(4)], [torch.zeros(4)], [torch.zeros(4)], lr=1e-3, step=1)),
    ("v-lengths", lambda: K.adam_step([tt(4)], [tt(4)], None, [], lr=1e-3, step=1)),
    ("empty", lambda: K.adam_step([], [], [], [], lr=1e-3, step=1)),
    ("grad-shape", lambda: K.adam_step([tt(4)], [tt(5)], None, [torch.zeros(4)], lr=1e-3, step=1)),
    ("v-shape", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(2, 2)], lr=1e-3, step=1)),
    ("v-float16", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4, dtype=torch.float16)], lr=1e-3,
                                      step=1)),
    ("lr-negative", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=-1e-3, step=1)),
    ("eps-zero", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, eps=0.0, step=1)),
    ("weight_decay-inf", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3,
                                             weight_decay=float("inf"), step=1)),
    ("step-float", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, step=2.0)),
    ("step-huge", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr=1e-3, step=2**63)),
    ("lr-str", lambda: K.adam_step([tt(4)], [tt(4)], None, [torch.zeros(4)], lr="1e-3", step=1)),
    ("params-twice", lambda: (lambda p: K.adam_step([p, p], [tt(4), tt(4)], None, [torch.zeros(4), torch.zeros(4)],
                                                    lr=1e-3, step=1))(tt(4))),
    ("v-is-m", lambda: (lambda m: K.adam_step([tt(4)], [tt(4)], [m], [m], lr=1e-3, beta1=0.9, step=1))(
        torch.zeros(4))),
]

VALID = [
    ("moments-f32", lambda: _adam(torch.float32, True, False)),
    ("adamw-bf16", lambda: _adam(torch.bfloat16, True, True)),
    ("no-moments-f16", lambda: _adam(torch.float16, False, False)),
]


@pytest.mark.parametrize("call", calls(WRAPPER_CASES, BACKEND_CASES))
def test_backends_raise_the_same_errors(call):
    """Wherever the call would run (the C kernels, the PyTorch reference), it fails with the same words."""
    assert_same_error(call)


@pytest.mark.parametrize("call", calls(VALID))
def test_backends_agree(call):
    assert_backends_agree(call, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", calls(VALID))
def test_deterministic(call):
    assert_deterministic(call)


MIXED_SIZES = (1, 3, 1023, 1024, 1025, 70_000, 5, 2048)  # tiny and large tensors in one call, across chunk edges


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adam_step_mixed_sizes(dtype, beta1):
    gen = torch.Generator().manual_seed(13)
    params = [torch.randn(n, generator=gen).to(dtype) for n in MIXED_SIZES]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in MIXED_SIZES]
    m = [torch.randn(n, generator=gen) * 0.1 for n in MIXED_SIZES]
    v = [torch.rand(n, generator=gen) for n in MIXED_SIZES]
    want = [ref.adam(as64(p), as64(g), mm.double().numpy(), vv.double().numpy(), 1e-2, beta1, 0.999, 1e-8, 0.0, 3,
                     False) for p, g, mm, vv in zip(params, grads, m, v, strict=True)]
    kernels.adam_step(params, grads, m, v, lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.0, step=3)
    tol = TOLERANCES[dtype]
    for p, mm, vv, (wp, wm, wv) in zip(params, m, v, want, strict=True):
        np.testing.assert_allclose(as64(p), wp, rtol=tol["rtol"], atol=max(tol["atol"], 1e-5))
        if beta1:
            np.testing.assert_allclose(mm.numpy(), wm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(vv.numpy(), wv, rtol=1e-5, atol=1e-9)


def test_adam_step_bad_item_after_plain_ones_is_named():
    params = [torch.zeros(4), torch.zeros(4)]
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        kernels.adam_step(params, [torch.ones(4), None], None, [torch.zeros(4), torch.zeros(4)], lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\]: a lazily negated"):
        kernels.adam_step(params, [torch.ones(4), torch.ones(4)], None,
                          [torch.zeros(4), torch._neg_view(torch.zeros(4))], lr=1e-3, step=1)


# --------------------------------------------------------------------------- the fast list path

FAST = kernels.ops._FAST
ADAM_KW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 4}


def _state(n: int = 3, size: int = 6, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(22)
    return [[torch.randn(size, generator=gen).to(dtype) for _ in range(n)],
            [torch.randn(size, generator=gen).to(dtype) for _ in range(n)],
            [torch.randn(size, generator=gen) * 0.1 for _ in range(n)],
            [torch.rand(size, generator=gen) for _ in range(n)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first_moment", [True, False])
def test_fast_path_runs_plain_lists_bit_for_bit(dtype, first_moment):
    p, g, m, v = _state(dtype=dtype)
    kw = {**ADAM_KW, "beta1": 0.9 if first_moment else 0.0}
    want = [[t.clone() for t in lst] for lst in (p, g, m, v)]
    _core.adam_step(want[0], want[1], want[2] if first_moment else None, want[3], **kw)  # the checked path
    params = [torch.nn.Parameter(t) for t in p]
    assert _core.adam_step(params, tuple(g), m if first_moment else None, v, **kw, fast=FAST) is None
    for got, exp in zip((p, m, v), (want[0], want[2], want[3]), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, exp, strict=True))


def test_fast_path_hands_back_what_it_cannot_take_untouched():
    p, g, m, v = _state()
    cases = [
        (p, g, [t.bfloat16() for t in m], v, ADAM_KW),  # moments must be float32
        (p, g, m, [v[0], v[1], torch._neg_view(v[2])], ADAM_KW),
        (p, g, m[:2], v, ADAM_KW),
        (p, g, None, v, ADAM_KW),  # beta1 != 0 needs exp_avgs
        (p, g, m, v, {**ADAM_KW, "step": 0}),
        (p, g, m, v, {**ADAM_KW, "decoupled": 2}),
        (p, [g[0], g[1], p[2]], m, v, ADAM_KW),  # params[2] is its own grad: an output overlapping an input
    ]
    before = [t.clone() for t in p + m + v]
    for params, grads, ms, vs, kw in cases:
        assert _core.adam_step(params, grads, ms, vs, **kw, fast=FAST) is NotImplemented
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before, strict=True))
    with pytest.raises(TypeError, match=r"exp_avgs\[0\]: expected dtype float32"):
        kernels.adam_step(p, g, [t.bfloat16() for t in m], v, **ADAM_KW)
