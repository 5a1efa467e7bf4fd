"""Noising, CFG, TA loss, generator gradient and DI* terms: C kernels vs float64 NumPy, per dtype.

Tolerances (conftest.TOLERANCES) are per output dtype: float32 arithmetic inside,
one rounding to the output dtype; element-wise outputs are compared with an
absolute tolerance scaled by the output's magnitude. Per-sample reductions are
float32 outputs of float32-lane / float64-chunk sums: rtol 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, TOLERANCES, as64, requires_cuda
from diffinstruct import kernels
from diffinstruct.kernels import reference as torch_ref

SHAPES = [(1, 5), (3, 4, 7, 9), (2, 4, 32, 40)]  # per_sample: 5, 252, 5120 (not multiples of 32/1024)
REDUCTION_RTOL = 1e-5


def make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def assert_elementwise(out, want, dtype):
    tol = TOLERANCES[dtype]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(as64(out), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def sigma_for(batch):
    return torch.tensor([0.05, 0.7, 2.5, 11.0, 0.3][:batch] + [1.3] * max(0, batch - 5), dtype=torch.float32)


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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("omega", [1.0, 4.5, -0.5])
def test_cfg_combine(dtype, omega):
    u, c = make((3, 4, 7, 9), dtype, 2), make((3, 4, 7, 9), dtype, 3)
    out = kernels.cfg_combine(u, c, omega)
    assert_elementwise(out, ref.cfg(as64(u), as64(c), omega), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighting,reduction", [("edm", "mean"), ("unit", "sum"), ("edm", "sum")])
def test_ta_loss(dtype, shape, weighting, reduction):
    d, x0 = make(shape, dtype, 4), make(shape, dtype, 5)
    sigma = sigma_for(shape[0])
    res = kernels.ta_loss(d, x0, sigma, weighting=weighting, reduction=reduction)
    loss, grad = ref.ta_loss(as64(d), as64(x0), sigma.double().numpy(), weighting, 0.5, reduction)
    np.testing.assert_allclose(res.loss.numpy(), loss, rtol=REDUCTION_RTOL)
    assert_elementwise(res.grad, grad, dtype)
    assert res.nonfinite.tolist() == [0] * shape[0]


def test_ta_gradient_is_the_autograd_gradient_of_the_mean_loss():
    d = make((4, 3, 8, 8), torch.float32, 6).requires_grad_(True)
    x0 = make((4, 3, 8, 8), torch.float32, 7)
    sigma = sigma_for(4)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    loss = (lam * ((d - x0) ** 2).mean(dim=(1, 2, 3))).mean()
    loss.backward()
    res = kernels.ta_loss(d, x0, sigma)
    torch.testing.assert_close(res.grad, d.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.loss.mean(), loss.detach(), rtol=1e-5, atol=0)


GEN_CASES = [
    dict(cfg=False, reward=False, weighting="normalized"),
    dict(cfg=True, reward=False, weighting="normalized"),
    dict(cfg=True, reward=True, weighting="normalized"),
    dict(cfg=True, reward=True, weighting="unit"),
    dict(cfg=False, reward=True, weighting="unit"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", GEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_generator_grad(dtype, shape, case):
    x0, ta, cond = make(shape, dtype, 8), make(shape, dtype, 9), make(shape, dtype, 10)
    uncond = make(shape, dtype, 11) if case["cfg"] else None
    dr = make(shape, dtype, 12) if case["reward"] else None
    omega, alpha = (4.5 if case["cfg"] else 1.0), (2.0 if case["reward"] else 0.0)
    res = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=omega, dr=dr, alpha=alpha,
                                 weighting=case["weighting"])
    want = ref.generator_grad(as64(x0), as64(ta), as64(cond), None if uncond is None else as64(uncond), omega,
                              None if dr is None else as64(dr), alpha, case["weighting"])
    assert res.grad.dtype == dtype
    assert_elementwise(res.grad, want["grad"], dtype)
    for key in ("weight", "ref_dist", "gap"):
        np.testing.assert_allclose(getattr(res, key).numpy(), want[key], rtol=REDUCTION_RTOL, err_msg=key)
    # the surrogate is a signed sum with cancellation: compare against its absolute scale
    scale = want["weight"] * np.abs(ref.per_sample(as64(ta)) * ref.per_sample(as64(x0))).sum(1)
    np.testing.assert_allclose(res.surrogate.numpy(), want["surrogate"], rtol=0, atol=float(1e-5 * scale.max()))
    assert res.nonfinite.tolist() == [0] * shape[0]


def test_generator_grad_normaliser_floor():
    x0 = torch.ones(2, 16)
    ref_same = x0.clone()  # |x0 - D_ref| = 0 -> W = 1 / 1e-5
    ta = x0 + 1.0
    res = kernels.generator_grad(x0, ta, ref_same, min_norm=1e-5)
    torch.testing.assert_close(res.weight, torch.full((2,), 1e5), rtol=1e-6, atol=0)
    torch.testing.assert_close(res.grad, torch.full_like(x0, 1e5 / 2), rtol=1e-6, atol=0)


def test_generator_grad_matches_autograd_of_the_pseudo_loss():
    """x0.backward(G) equals autograd of (1/B) sum_b [-alpha r_b + W_b <sg(D_TA - D_ref), x0_b>]."""
    b = 3
    x0 = make((b, 4, 6, 6), torch.float32, 13).requires_grad_(True)
    ta, cond, uncond = (make((b, 4, 6, 6), torch.float32, s) for s in (14, 15, 16))
    target = make((b, 4, 6, 6), torch.float32, 17)
    reward = -((x0 - target) ** 2).sum(dim=(1, 2, 3))  # r(x0) = -|x0 - a|^2
    dr = torch.autograd.grad(reward.sum(), x0, retain_graph=True)[0]
    with torch.no_grad():
        d_ref = uncond + 4.5 * (cond - uncond)
        w = 1.0 / (x0 - d_ref).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5)
    alpha = 0.3
    pseudo = (-alpha * reward + w * ((ta - d_ref) * x0).sum(dim=(1, 2, 3))).sum() / b
    (want,) = torch.autograd.grad(pseudo, x0)
    res = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=4.5, dr=dr, alpha=alpha)
    torch.testing.assert_close(res.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("c,weighting", [(1e-3, "sigma2"), (10.0, "sigma2"), (1.0, "unit"), (1e4, "unit")])
def test_huber_terms(dtype, shape, c, weighting):
    x0, dp, dq = make(shape, dtype, 18), make(shape, dtype, 19), make(shape, dtype, 20)
    sigma = sigma_for(shape[0])
    res = kernels.huber_terms(x0, dp, dq, sigma, c, weighting=weighting)
    want = ref.huber_terms(as64(x0), as64(dp), as64(dq), sigma.double().numpy(), c, weighting)
    for key in ("ysq", "h", "value"):
        np.testing.assert_allclose(getattr(res, key).numpy(), want[key], rtol=REDUCTION_RTOL, err_msg=key)
    y = ref.per_sample(as64(dp) - as64(dq))
    r = ref.per_sample(as64(dq) - as64(x0))
    yr_scale = (np.abs(y * r).sum(1) / sigma.double().numpy() ** 4).max()
    np.testing.assert_allclose(res.yr.numpy(), want["yr"], rtol=0, atol=1e-5 * yr_scale)
    for key in ("a", "b", "dprime"):
        assert_elementwise(getattr(res, key), want[key], dtype)


def test_torch_reference_matches_c_kernels():
    """The PyTorch reference (the CUDA fallback) agrees with the C kernels."""
    shape = (3, 4, 7, 9)
    x0, ta, cond, uncond, dr = (make(shape, torch.float32, s) for s in range(21, 26))
    sigma = sigma_for(3)
    c = kernels.generator_grad(x0, ta, cond, d_uncond=uncond, omega=3.0, dr=dr, alpha=0.5)
    r = torch_ref.generator_grad(x0, ta, cond, uncond, 3.0, dr, 0.5, "normalized", 1e-5)
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c = kernels.ta_loss(ta, x0, sigma)
    r = torch_ref.ta_loss(ta, x0, sigma, "edm", 0.5, "mean", True)
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c = kernels.huber_terms(x0, cond, ta, sigma, 0.5)
    r = torch_ref.huber_terms(x0, cond, ta, sigma, 0.5, "sigma2")
    for a, b in zip(c, r, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    xt_c = kernels.add_noise(x0, sigma, 5, 1)
    xt_r, _ = torch_ref.add_noise(x0, sigma, 5, 1, False)
    torch.testing.assert_close(xt_c, xt_r, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kernels.cfg_combine(uncond, cond, 2.0), torch_ref.cfg_combine(uncond, cond, 2.0))


def test_nonfinite_inputs_propagate_and_are_counted():
    x0 = torch.zeros(2, 40)
    ta = torch.ones(2, 40)
    cond = torch.zeros(2, 40)
    ta[1, 3] = float("nan")
    ta[1, 7] = float("inf")
    res = kernels.generator_grad(x0, ta, cond, weighting="unit")
    assert res.nonfinite.tolist() == [0, 2]
    assert torch.isnan(res.grad[1, 3]) and torch.isinf(res.grad[1, 7])
    assert torch.isfinite(res.grad[0]).all()


# --------------------------------------------------------------------------- non-finite outputs


def _overflow_cases(dtype, device="cpu"):
    """(name, call) pairs whose outputs overflow dtype from finite inputs, in every third element."""
    hot = (torch.arange(12, device=device) % 3 == 0).reshape(2, 6)
    zeros = torch.zeros(2, 6, dtype=dtype, device=device)
    ones_where_hot = hot.to(dtype)
    # TA at a small sigma: lambda(1e-3) ~ 1e6 overflows float16; float32/bfloat16 need sigma = 1e-18 and d = 1e3
    small = torch.full((2,), 1e-3 if dtype == torch.float16 else 1e-18, device=device)
    d = ones_where_hot if dtype == torch.float16 else ones_where_hot * 1000
    yield "ta_loss", lambda: kernels.ta_loss(d, zeros, small, reduction="sum")
    # generator at the W_b floor: x0 == D_cond, so W_b = 1 / min_norm; float16 only (W_b is float32)
    if dtype == torch.float16:
        yield "generator_grad", lambda: kernels.generator_grad(zeros, ones_where_hot, zeros, min_norm=1e-6)
        # DI*: y = 0, r = 1, h = c: b = r / (c B) overflows float16
        yield "huber_terms", lambda: kernels.huber_terms(zeros, ones_where_hot, ones_where_hot,
                                                         torch.ones(2, device=device), c=1e-6, weighting="unit")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_overflowing_outputs_are_counted_as_nonfinite(dtype):
    """Outputs that overflow to Inf from finite inputs count in `nonfinite` (inputs alone gave 0),
    element by element, and agree with the PyTorch reference."""
    for name, call in _overflow_cases(dtype):
        res = call()
        vec = res.grad if name != "huber_terms" else res.b
        assert not bool(torch.isfinite(vec.float()).all()), name
        assert res.nonfinite.tolist() == [2, 2], (name, res.nonfinite.tolist())  # elements 0 and 3 of each row
        assert res.nonfinite.tolist() == (~torch.isfinite(vec.float().reshape(2, -1))).sum(1).tolist()


def test_overflow_counts_match_the_torch_reference():
    """The reference (the CUDA fallback) counts the same elements."""
    zeros = torch.zeros(2, 6, dtype=torch.float16)
    hot = (torch.arange(12) % 3 == 0).reshape(2, 6).to(torch.float16)
    ta = torch_ref.ta_loss(hot, zeros, torch.full((2,), 1e-3), "edm", 0.5, "sum", True)
    gen = torch_ref.generator_grad(zeros, hot, zeros, None, 1.0, None, 0.0, "normalized", 1e-6)
    hub = torch_ref.huber_terms(zeros, hot, hot, torch.ones(2), 1e-6, "unit")
    assert ta.nonfinite.tolist() == gen.nonfinite.tolist() == hub.nonfinite.tolist() == [2, 2]


@requires_cuda
def test_overflow_counts_cpu_and_cuda_agree():
    cases = zip(_overflow_cases(torch.float16), _overflow_cases(torch.float16, "cuda"), strict=True)
    for (name, on_cpu), (_, on_cuda) in cases:
        assert on_cpu().nonfinite.tolist() == on_cuda().nonfinite.cpu().tolist() == [2, 2], name
