"""Theorem 3.4 (CFG is an implicit reward) through the fused generator-gradient kernel.

A self-contained check (docs/ALGORITHM.md section 5): reference p(x0|+-) = N(+-1.5, 0.25), class "+";
generator q = N(m, v); exact TA score. The kernel, fed the analytic denoisers on a quadrature
grid of (z, eps), must reproduce the finite-difference gradient of KL(q_sigma || p*_sigma),
p* ~ p(x|c)^w p(x)^(1-w), to 1e-5 -- once as DI with an omega-CFG teacher and once as DI++
with the implicit reward (omega - 1) log p(c | x_t) (alpha = omega - 1, dr = sigma^2 grad r,
the reward gradient in the kernel's denoiser units).

All denoisers are fed relative to x_t (D - x_t = sigma^2 s): the kernel's output depends only
on differences of denoisers, so this is exact and keeps float32 rounding far below 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffinstruct import kernels

MU, S2 = 1.5, 0.25
N_GRID, L = 201, 8.0
GRID = np.linspace(-L, L, N_GRID)
WEIGHTS = np.exp(-0.5 * GRID**2) / math.sqrt(2 * math.pi) * (2 * L / (N_GRID - 1))


def npdf(x, m, v):
    return np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)


def ref_scores(x, sigma):
    v = S2 + sigma**2
    p_plus, p_minus = npdf(x, MU, v), npdf(x, -MU, v)
    s_c = (MU - x) / v
    g = p_plus / (p_plus + p_minus)
    s_u = (g * (MU - x) + (1 - g) * (-MU - x)) / v
    return s_c, s_u


def kl_to_tilted(m, log_v, sigma, omega):
    v = math.exp(log_v) + sigma**2
    x = m + math.sqrt(v) * GRID
    vv = S2 + sigma**2
    log_c = np.log(npdf(x, MU, vv))
    log_u = np.log(0.5 * npdf(x, MU, vv) + 0.5 * npdf(x, -MU, vv))
    return float(np.sum(WEIGHTS * (np.log(npdf(x, m, v)) - (omega * log_c + (1 - omega) * log_u))))


def finite_difference(m, log_v, sigma, omega, h=1e-4):
    dm = (kl_to_tilted(m + h, log_v, sigma, omega) - kl_to_tilted(m - h, log_v, sigma, omega)) / (2 * h)
    dlv = (kl_to_tilted(m, log_v + h, sigma, omega) - kl_to_tilted(m, log_v - h, sigma, omega)) / (2 * h)
    return np.array([dm, dlv])


def kernel_gradient(m, log_v, sigma, omega, implicit_reward):
    sv = math.exp(0.5 * log_v)
    v = math.exp(log_v) + sigma**2
    z, e = np.meshgrid(GRID, GRID, indexing="ij")
    w = np.outer(WEIGHTS, WEIGHTS).reshape(1, -1)
    x0 = m + sv * z
    xt = x0 + sigma * e
    s_q = -(xt - m) / v
    s_c, s_u = ref_scores(xt, sigma)

    def rel(score):  # D - x_t = sigma^2 * score, as a (1, N) float32 batch of one sample
        return np.ascontiguousarray((sigma**2 * score).reshape(1, -1), dtype=np.float32)

    x0_in = np.ascontiguousarray(x0.reshape(1, -1), dtype=np.float32)  # unused by 'unit' weighting
    if implicit_reward:
        res = kernels.generator_grad(x0_in, rel(s_q), rel(s_c), dr=rel(s_c - s_u), alpha=omega - 1.0,
                                     weighting="unit")
    else:
        res = kernels.generator_grad(x0_in, rel(s_q), rel(s_c), d_uncond=rel(s_u), omega=omega, weighting="unit")
    score_diff = res.grad.astype(np.float64) / sigma**2  # batch of one: G = D_q - D_ref^w
    dxt = [np.ones_like(z).reshape(1, -1), (0.5 * sv * z).reshape(1, -1)]  # d x_t / d(m, log v)
    return np.array([np.sum(w * score_diff * d) for d in dxt])


@pytest.mark.parametrize("m,v,sigma,omega", [(0.3, 0.8, 0.5, 4.5), (1.0, 0.2, 1.2, 1.5), (-0.4, 1.0, 0.1, 3.0)])
@pytest.mark.parametrize("implicit_reward", [False, True], ids=["DI-with-CFG-teacher", "DIpp-implicit-reward"])
def test_kernel_gradient_equals_finite_difference(m, v, sigma, omega, implicit_reward):
    fd = finite_difference(m, math.log(v), sigma, omega)
    got = kernel_gradient(m, math.log(v), sigma, omega, implicit_reward)
    np.testing.assert_allclose(got, fd, rtol=0, atol=1e-5)


def test_both_forms_agree_with_each_other():
    a = kernel_gradient(0.3, math.log(0.8), 0.5, 4.5, False)
    b = kernel_gradient(0.3, math.log(0.8), 0.5, 4.5, True)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
