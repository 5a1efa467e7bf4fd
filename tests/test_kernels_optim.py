"""Multi-tensor EMA and Adam/AdamW vs float64 NumPy and torch.optim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, TOLERANCES, as64
from diffinstruct import kernels
from diffinstruct.kernels import reference

SHAPES = [(3,), (17, 5), (4, 33, 9), (2100,)]


def tensors(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


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
    ema_c, ema_r = [g.clone() for g in grads], [g.clone() for g in grads]
    kernels.ema_update(ema_c, params_c, 0.95)
    reference.ema_update(ema_r, params_r, 0.95)
    for a, b in zip(params_c + m_c + v_c + ema_c, params_r + m_r + v_r + ema_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
