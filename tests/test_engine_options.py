"""Engine options: NaN/Inf guard, gradient accumulation, bf16 autocast, config validation, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from diffinstruct import toy
from diffinstruct.config import DIConfig
from diffinstruct.errors import ConfigError, TrainingDiverged
from diffinstruct.trainer import DITrainer

FAST = dict(lr_generator=1e-3, lr_ta=1e-3, batch_size=32, p_mean=-1.0, p_std=1.5, sigma_max=10.0)


class NaNReward(torch.nn.Module):
    name = "nan"

    def forward(self, x0, prompts, cond):
        return x0.sum(dim=1) * float("nan")


def make(cfg, reward=None, seed=0):
    mix = toy.GaussianMixture(toy.default_means(4), s2=0.05)
    models = toy.build_models(mix, hidden=32, seed=seed)
    return models, DITrainer(cfg, models, toy.class_prompts(4), reward)


def test_nonfinite_steps_are_skipped_counted_then_stop():
    models, trainer = make(DIConfig(method="dipp", alpha=1.0, max_bad_steps=3, **FAST), NaNReward())
    before = [p.detach().clone() for p in models.generator_params]
    for step in range(2):
        metrics = trainer.train_step(step)
        assert metrics["generator_ok"] == 0.0 and metrics["generator_nonfinite"] > 0
    assert metrics["skipped_steps"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, models.generator_params, strict=True))
    with pytest.raises(TrainingDiverged, match="3 steps in a row produced NaN/Inf"):
        trainer.train_step(2)


def test_gradient_accumulation_sums_micro_batches():
    cfg2 = DIConfig(method="dipp", grad_accum=2, **FAST)
    models, trainer = make(cfg2)
    trainer.accumulate_generator_grads(step=5)
    accumulated = torch.cat([p.grad.flatten() for p in models.generator_params])
    for p in models.generator_params:
        p.grad = None
    trainer1 = DITrainer(DIConfig(method="dipp", grad_accum=1, **FAST), models, toy.class_prompts(4))
    metrics = {k: [] for k in ("weight", "ref_dist", "gap", "surrogate", "reward", "sigma", "divergence", "h")}
    trainer1._dipp_micro(5, 0, metrics)
    trainer1._dipp_micro(5, 1, metrics)
    summed = torch.cat([p.grad.flatten() for p in models.generator_params])
    torch.testing.assert_close(accumulated * 2, summed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["di", "dipp", "distar"])
def test_bf16_autocast_steps_are_finite(method):
    cfg = DIConfig(method=method, bf16=True, alpha=0.0, **FAST)
    models, trainer = make(cfg)
    before = [p.detach().clone() for p in models.generator_params]
    for step in range(3):
        metrics = trainer.train_step(step)
    assert metrics["generator_ok"] == 1.0 and metrics["ta_ok"] == 1.0
    assert math.isfinite(metrics["ta_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, models.generator_params, strict=True))


def test_metrics_report_the_time_split_and_diagnostics():
    _, trainer = make(DIConfig(method="dipp", **FAST))
    metrics = trainer.train_step(0)
    for key in ("ta_loss", "weight", "ref_dist", "gap", "sigma", "generator_grad_norm", "skipped_steps",
                "time_total", "time_kernels", "time_networks"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0 < metrics["time_kernels"] < metrics["time_total"]


@pytest.mark.parametrize("data,match", [
    ({"method": "dmd"}, "method = 'dmd' is not valid; choose one of di, dipp, distar"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"omega": -1.0}, "omega = -1.0 must be >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"lr_ta": "fast"}, "lr_ta must be a finite number"),
    ({"method": "di", "alpha": 1.0}, "alpha must be 0 with method = 'di'"),
    ({"generator_weightng": "unit"}, "unknown option\\(s\\) generator_weightng; valid options:"),
    ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max \\(1.0\\) must be >= sigma_min \\(2.0\\)"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        DIConfig.from_dict(data)


def test_alpha_without_a_reward_is_refused():
    mix = toy.GaussianMixture(toy.default_means(2))
    with pytest.raises(ValueError, match="alpha > 0 needs a reward"):
        DITrainer(DIConfig(method="dipp", alpha=1.0), toy.build_models(mix, hidden=16), toy.class_prompts(2))


def test_distar_refuses_a_noisy_reward_by_name():
    """DI* differentiates r(x0); the implicit-CFG reward only has a gradient at x_t (it used to fail mid-step)."""
    from diffinstruct.rewards import ImplicitCFGReward

    mix = toy.GaussianMixture(toy.default_means(2))
    models = toy.build_models(mix, hidden=16)
    with pytest.raises(ConfigError, match="method = distar cannot use the implicit_cfg reward"):
        DITrainer(DIConfig(method="distar", alpha=1.0), models, toy.class_prompts(2), ImplicitCFGReward(mix))
    DITrainer(DIConfig(method="dipp", alpha=1.0), models, toy.class_prompts(2), ImplicitCFGReward(mix))
