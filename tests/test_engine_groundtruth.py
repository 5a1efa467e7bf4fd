"""The engine against analytic ground truth on the 2-D Gaussian mixture (issue: training engine).

1. DI shrinks the MMD to reference samples at least 5x.
2. DI with an omega-CFG teacher and DI++ with the implicit reward (omega - 1) log p(c | x_t)
   give the same generator gradient (unit weighting, where the identity is exact).
3. DI++ with r(x) = -|x - a|^2 moves the generator's mean toward a, monotonically in alpha;
   alpha = 0 stays at the reference.
4. DI*'s surrogate (through the fused kernel) has the gradient of the exact pseudo-Huber
   score divergence (central finite differences of the closed-form divergence; docs/ALGORITHM.md section 6).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from diffinstruct import toy
from diffinstruct.config import DIConfig
from diffinstruct.rewards import ImplicitCFGReward, TargetReward
from diffinstruct.trainer import DITrainer, distar_surrogate

FAST = dict(lr_generator=1e-3, lr_ta=2e-3, p_mean=-1.0, p_std=1.5, sigma_max=10.0)


def train(models, cfg, steps, reward=None, classes=4):
    trainer = DITrainer(cfg, models, toy.class_prompts(classes), reward)
    for step in range(steps):
        trainer.train_step(step)
    return trainer


def test_di_reduces_mmd_fivefold():
    torch.manual_seed(0)
    mix = toy.GaussianMixture(toy.default_means(4), s2=0.02)
    models = toy.build_models(mix, hidden=128, seed=0)
    labels = torch.arange(2000) % 4
    reference = mix.sample(labels, torch.Generator().manual_seed(1))
    before = toy.mmd(toy.generate(models, labels, 5), reference)
    train(models, DIConfig(method="di", batch_size=256, **FAST), 400)
    after = toy.mmd(toy.generate(models, labels, 5), reference)
    noise_floor = toy.mmd(mix.sample(labels, torch.Generator().manual_seed(2)), reference)
    print(f"MMD before {before:.4f}, after {after:.4f} (two reference draws: {noise_floor:.4f})")
    assert after * 5 <= before


def test_implicit_reward_log_p_c_gradient_is_tweedie():
    """grad_{x_t} log p(c | x_t) computed by autograd of the exact mixture equals (D_c - D_u) / sigma^2."""
    mix = toy.GaussianMixture(toy.default_means(4), s2=0.05)
    xt = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((64,), 0.7, dtype=torch.float64)
    labels = torch.arange(64) % 4
    v = mix.s2 + 0.49
    means = mix.means.double()
    log_comp = -((xt[:, None, :] - means[None]) ** 2).sum(-1) / (2 * v)
    log_p_c = log_comp[torch.arange(64), labels] - torch.logsumexp(log_comp, dim=1)
    (auto,) = torch.autograd.grad(log_p_c.sum(), xt)
    mix64 = copy.deepcopy(mix).double()
    got = ImplicitCFGReward(mix64).grad_xt(xt.detach(), sigma, labels, torch.full((64,), toy.NULL_CLASS))
    torch.testing.assert_close(got.double(), auto, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("omega", [1.5, 4.5])
def test_cfg_teacher_equals_implicit_reward(omega):
    mix = toy.GaussianMixture(toy.default_means(4), s2=0.05)
    models = toy.build_models(mix, hidden=64, seed=3)
    base = dict(batch_size=64, generator_weighting="unit", **FAST)
    cfg_di = DIConfig(method="di", omega=omega, **base)
    cfg_pp = DIConfig(method="dipp", omega=1.0, alpha=omega - 1.0, **base)
    grads = []
    for cfg, reward in ((cfg_di, None), (cfg_pp, ImplicitCFGReward(mix))):
        trainer = DITrainer(cfg, models, toy.class_prompts(4), reward)
        trainer.accumulate_generator_grads(step=7)
        grads.append(torch.cat([p.grad.flatten() for p in models.generator_params]))
        for p in models.generator_params:
            p.grad = None
    scale = grads[0].abs().max()
    assert scale > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5 * float(scale))


def test_reward_pulls_the_mean_monotonically_in_alpha():
    mix = toy.GaussianMixture(toy.default_means(1), s2=0.1)
    target = torch.tensor([-1.0, 1.0])
    labels = torch.zeros(4000, dtype=torch.int64)
    reference_mean = mix.means[0]
    distances, means = [], []
    for alpha in (0.0, 0.1, 1.0, 10.0):
        models = toy.build_models(mix, hidden=64, seed=0)
        cfg = DIConfig(method="dipp", alpha=alpha, batch_size=128, **FAST)
        train(models, cfg, 300, reward=TargetReward(target), classes=1)
        samples = toy.generate(models, labels, 11)
        means.append(samples.mean(0))
        distances.append(float((samples.mean(0) - target).norm()))
    print("alpha 0, 0.1, 1, 10 -> |mean - a| =", [round(d, 4) for d in distances])
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    # alpha = 0: the reference mean, within sampling error plus a small fit error
    standard_error = math.sqrt(mix.s2 / labels.numel())
    assert float((means[0] - reference_mean).abs().max()) < 4 * standard_error + 0.03


# ---------------------------------------------------------------- 4. DI* surrogate vs finite differences
C_HUBER, SIGMA = 0.7, 0.6
A_REF = 1 + SIGMA**2  # reference: x0 ~ N(0, I), so at sigma the marginal variance is 1 + sigma^2


def hermite(n):
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return nodes, weights / math.sqrt(2 * math.pi)


def divergence_exact(theta):
    """E over x_t ~ q_theta of d(s_ref - s_q) for the Gaussian generator x0 = theta * z (closed-form scores)."""
    b = theta**2 + SIGMA**2
    k = 1 / b - 1 / A_REF
    u, w = hermite(80)
    x1, x2 = np.sqrt(b[0]) * u[:, None], np.sqrt(b[1]) * u[None, :]
    d = np.sqrt((k[0] * x1) ** 2 + (k[1] * x2) ** 2 + C_HUBER**2) - C_HUBER
    return float((w[:, None] * w[None, :] * d).sum())


@pytest.mark.parametrize("theta", [(0.5, 1.7), (1.3, 0.8)])
def test_distar_surrogate_gradient_matches_finite_differences(theta):
    th = np.array(theta)
    h = 1e-5
    fd = [(divergence_exact(th + h * e) - divergence_exact(th - h * e)) / (2 * h) for e in np.eye(2)]
    nodes, weights = hermite(20)
    grid = torch.tensor(np.stack(np.meshgrid(nodes, nodes, nodes, nodes, indexing="ij"), -1).reshape(-1, 4))
    wq = torch.tensor(np.einsum("i,j,k,l->ijkl", weights, weights, weights, weights).reshape(-1))
    z, e = grid[:, :2].float(), grid[:, 2:].float()
    theta_t = torch.tensor(theta, dtype=torch.float32, requires_grad=True)
    x0 = theta_t * z
    xt = x0 + SIGMA * e
    d_p = (1 - SIGMA**2 / A_REF) * xt  # exact reference denoiser, differentiable in x_t
    b = theta_t.detach() ** 2 + SIGMA**2
    d_q = (1 - SIGMA**2 / b) * xt  # the TA: exact for the current generator, weights frozen
    sigma = torch.full((xt.shape[0],), SIGMA)
    batch = xt.shape[0]
    # weighting "unit" (w = 1): the kernel's vectors carry 1/B, so weights are rescaled by B
    surrogate, _ = distar_surrogate(x0, d_p, d_q, sigma, C_HUBER, "unit", sample_weight=wq.float() * batch)
    (grad,) = torch.autograd.grad(surrogate, theta_t)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=2e-4, atol=1e-5)
