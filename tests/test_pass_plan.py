"""The DI++ step's pass plan (docs/ALGORITHM.md section 4): which networks run how often, on what batch, and how
often the step waits for the device.

ta_sample = "reuse" (default): generator forward + backward, TA and reference (cond + uncond as one batch of 2B)
forward, then the TA's update on the generator's detached sample: 4 network passes. "fresh": the TA first, on its
own sample (one more generator forward). reference_pass = "split": cond and uncond as two passes of B.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from diffinstruct import kernels, toy
from diffinstruct.config import DIConfig
from diffinstruct.errors import ConfigError
from diffinstruct.prompts import join_conditioning
from diffinstruct.rewards import TargetReward
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state

BASE = dict(method="dipp", alpha=0.5, omega=2.0, batch_size=8, lr_generator=1e-3, lr_ta=1e-3)


def make(**over):
    mix = toy.GaussianMixture(toy.default_means(4), s2=0.05)
    models = toy.build_models(mix, hidden=32, seed=0)
    trainer = DITrainer(DIConfig(**{**BASE, **over}), models, toy.class_prompts(4),
                        TargetReward(torch.tensor([1.0, 1.0])))
    return models, trainer


def count_passes(models, trainer, step=1):
    """Forward calls (and their batch sizes) of the generator's, the TA's and the reference's networks."""
    calls = collections.defaultdict(list)
    hooks = [net.register_forward_pre_hook(lambda m, args, name=name: calls[name].append(args[0].shape[0]))
             for name, net in (("generator", models.generator), ("ta", models.ta), ("reference", models.reference))]
    try:
        trainer.train_step(step)
    finally:
        for h in hooks:
            h.remove()
    return dict(calls)


@pytest.mark.parametrize("plan, reference_pass, expected", [
    ("reuse", "joint", {"generator": [8], "ta": [8, 8], "reference": [16]}),
    ("reuse", "split", {"generator": [8], "ta": [8, 8], "reference": [8, 8]}),
    ("fresh", "joint", {"generator": [8, 8], "ta": [8, 8], "reference": [16]}),
    ("fresh", "split", {"generator": [8, 8], "ta": [8, 8], "reference": [8, 8]}),
    ("onepass", "joint", {"generator": [8], "ta": [8], "reference": [16]}),
    ("onepass", "split", {"generator": [8], "ta": [8], "reference": [8, 8]}),
])
def test_network_passes_per_iteration(plan, reference_pass, expected):
    models, trainer = make(ta_sample=plan, reference_pass=reference_pass)
    assert count_passes(models, trainer) == expected


def test_omega_one_runs_no_unconditional_pass():
    models, trainer = make(omega=1.0)
    assert count_passes(models, trainer)["reference"] == [8]


def test_more_ta_steps_draw_fresh_samples_after_the_reused_one():
    models, trainer = make(ta_steps=3)
    calls = count_passes(models, trainer)
    assert calls["generator"] == [8, 8, 8] and calls["ta"] == [8, 8, 8, 8]


def test_the_ta_trains_on_the_generator_steps_sample():
    """Reuse: the TA's regression target is exactly the sample the generator step drew (detached)."""
    _, trainer = make()
    samples = []
    trainer.accumulate_generator_grads(3, samples)
    seen = []
    original = trainer.ta

    def spy(xt, sigma, cond):
        seen.append(xt.detach().clone())
        return original(xt, sigma, cond)

    trainer.ta = spy
    trainer.accumulate_ta_grads(3, 0, samples)
    (sample,) = samples
    assert not sample.x0.requires_grad
    # x_t = x0 + sigma eps with sigma, eps from the TA's own streams: x_t - x0 is the same noise a fresh plan draws
    sigma = trainer._sigma(3, "ta_sigma", 0)
    eps = (seen[0] - sample.x0) / sigma[:, None]
    fresh_noise = torch.empty_like(eps)
    kernels.fill_normal(fresh_noise, trainer._seed(3, "ta_eps", 0))
    torch.testing.assert_close(eps, fresh_noise, rtol=1e-4, atol=1e-4)


def test_onepass_trains_the_ta_on_the_generator_steps_own_xt():
    """onepass: one TA forward on the generator step's x_t; its gradients are those of the TA's denoising loss on
    that x_t regressing on the detached sample, and the generator's are those of "reuse" (same TA output there)."""
    _, trainer = make(ta_sample="onepass")
    _, reuse = make(ta_sample="reuse")
    seen = []
    original = trainer.ta

    def spy(xt, sigma, cond):
        seen.append((xt.detach().clone(), sigma.clone(), cond))
        return original(xt, sigma, cond)

    trainer.ta = spy
    results = []
    trainer.accumulate_generator_grads(3, ta_results=results)
    (xt, sigma, cond), = seen
    assert len(results) == 1
    samples = []
    reuse.accumulate_generator_grads(3, samples)
    for a, b in zip(trainer.generator_params, reuse.generator_params, strict=True):
        assert torch.equal(a.grad, b.grad)
    (sample,) = samples
    noise = torch.empty_like(sample.x0)
    kernels.fill_normal(noise, trainer._seed(3, "eps", 0))  # the generator half's eps, not the "ta_eps" stream
    torch.testing.assert_close((xt - sample.x0) / sigma[:, None], noise, rtol=1e-4, atol=1e-4)
    # the TA's gradient: its DSM loss on exactly that x_t, through autograd
    for p in reuse.ta_params:
        p.grad = None
    res = kernels.ta_loss(reuse.ta(xt, sigma, cond).detach().float().contiguous(), sample.x0, sigma,
                          weighting=reuse.cfg.ta_weighting, sigma_data=reuse.cfg.sigma_data,
                          reduction=reuse.cfg.ta_reduction)
    reuse.ta(xt, sigma, cond).backward(res.grad)
    assert any(p.grad.abs().max() > 0 for p in trainer.ta_params)
    for a, b in zip(trainer.ta_params, reuse.ta_params, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(results[0][0], res.loss.mean())


def test_onepass_is_refused_for_distar():
    with pytest.raises(ConfigError, match="ta_sample = 'onepass' needs method"):
        DIConfig(method="distar", ta_sample="onepass").validate()


def test_onepass_is_refused_for_distar_also_when_cfg_is_replaced_after_validation():
    _, trainer = make(method="distar", alpha=0.0)
    trainer.cfg = dataclasses.replace(trainer.cfg, ta_sample="onepass")  # no validate() on this path
    with pytest.raises(ConfigError, match="ta_sample = 'onepass' needs method"):
        trainer.train_step(0)


def test_joint_and_split_reference_give_the_same_step():
    """One batch of 2B or two of B: the same gradients up to float32 rounding of the batched matmuls."""
    grads = {}
    for mode in ("joint", "split"):
        models, trainer = make(reference_pass=mode)
        trainer.accumulate_generator_grads(2)
        grads[mode] = torch.cat([p.grad.flatten() for p in models.generator_params])
    assert grads["joint"].abs().max() > 0
    torch.testing.assert_close(grads["joint"], grads["split"], rtol=1e-5, atol=1e-7)


def test_conditionings_that_do_not_stack_fall_back_to_two_passes():
    assert join_conditioning(torch.zeros(2, 3), torch.zeros(2, 4)) is None
    assert join_conditioning({"a": torch.zeros(2, 3)}, {"b": torch.zeros(2, 3)}) is None
    joined = join_conditioning({"a": torch.ones(2, 3)}, {"a": torch.zeros(2, 3)})
    assert joined["a"].shape == (4, 3) and joined["a"][:2].eq(1).all() and joined["a"][2:].eq(0).all()


@pytest.mark.parametrize("plan", ["reuse", "onepass"])
def test_one_device_to_host_transfer_per_step(monkeypatch, plan):
    """No .item()/float()/int()/bool() of a tensor inside a step; one .tolist() for every metric and decision, plus
    one per optimiser for its CPU step counters (torch keeps `step` on the CPU: no device sync)."""
    _, trainer = make(ta_sample=plan)
    trainer.train_step(0)
    counts = collections.Counter()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer.train_step(1)
    monkeypatch.undo()
    assert counts == {"tolist": 1 + 2}


def test_no_gradient_copy_without_accumulation():
    _, trainer = make()
    g = torch.ones(3)
    assert trainer._scaled(g) is g
    _, trainer2 = make(grad_accum=2)
    torch.testing.assert_close(trainer2._scaled(g), g / 2)


@pytest.mark.parametrize("plan, over", [("reuse", {}), ("fresh", {}), ("onepass", {}),
                                        ("onepass", {"grad_accum": 2, "batch_size": 4, "ta_steps": 2})])
def test_every_plan_trains_and_is_reproducible(plan, over):
    states = []
    for _ in range(2):
        _, trainer = make(ta_sample=plan, **over)
        for step in range(4):
            metrics = trainer.train_step(step)
            assert metrics["ta_ok"] == 1.0 and metrics["generator_ok"] == 1.0
        states.append(full_state(trainer))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_plans_differ():
    """The plans are different algorithms' orders (the TA lags the generator by one step under reuse and onepass;
    onepass's TA sees other noise than reuse's)."""
    out = {}
    for plan in ("reuse", "fresh", "onepass"):
        models, trainer = make(ta_sample=plan)
        for step in range(3):
            trainer.train_step(step)
        out[plan] = torch.cat([p.detach().flatten() for p in models.generator_params])
    assert not torch.equal(out["reuse"], out["fresh"])
    assert not torch.equal(out["reuse"], out["onepass"])


@pytest.mark.parametrize("key, value", [("ta_sample", "both"), ("reference_pass", "batched")])
def test_bad_plan_names_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key} = '{value}' is not valid"):
        DIConfig(**{key: value}).validate()


def _shared(bf16: bool):
    from diffinstruct import assembly
    from diffinstruct.denoisers import EDMDenoiser

    torch.manual_seed(0)
    teacher = EDMDenoiser(toy.MLPNet(2, 4, 32))
    models = assembly.build_models(teacher, (2,), mode="shared", rank=2, sigma_init=2.5)
    cfg = DIConfig(**{**BASE, "bf16": bf16})
    return models, DITrainer(cfg, models, toy.class_prompts(4), TargetReward(torch.tensor([1.0, 1.0])))


def test_bf16_keeps_the_frozen_base_in_bf16_with_the_same_bits(monkeypatch):
    """Under bf16 the shared base's frozen weights are stored in bf16 (autocast cast them to the same values on
    every pass): the training run is bit-identical to casting on the fly, and the adapters stay float32."""
    from diffinstruct import lora
    from diffinstruct import trainer as trainer_module

    models, trainer = _shared(bf16=True)
    layers = [m for m in models.reference.modules() if isinstance(m, lora.LoRALayer)]
    assert layers and all(m.base.weight.dtype == torch.bfloat16 for m in layers)
    assert all(p.dtype == torch.float32 for p in trainer.generator_params + trainer.ta_params)
    monkeypatch.setattr(trainer_module, "store_frozen_in", lambda module, dtype: 0)
    models_cast, trainer_cast = _shared(bf16=True)
    assert all(m.base.weight.dtype == torch.float32 for m in models_cast.reference.modules()
               if isinstance(m, lora.LoRALayer))
    for step in range(3):
        trainer.train_step(step)
        trainer_cast.train_step(step)
    a, b = full_state(trainer), full_state(trainer_cast)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_base_runs_outside_autocast():
    models, _ = _shared(bf16=True)
    x = torch.randn(5, 2)
    out = models.reference(x, torch.full((5,), 0.7), torch.zeros(5, dtype=torch.long))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_onepass_resumes_bitwise(tmp_path):
    """A checkpoint of an onepass run, loaded into a fresh trainer, continues exactly as the run that kept going."""
    from diffinstruct import checkpoint as ckpt

    _, a = make(ta_sample="onepass")
    for step in range(2):
        a.train_step(step)
    ckpt.save_checkpoint(a, tmp_path, 2)
    _, b = make(ta_sample="onepass")
    ckpt.load_checkpoint(b, tmp_path)
    for step in range(2, 4):
        a.train_step(step)
        b.train_step(step)
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_full_mode_stores_the_reference_and_keeps_the_bits_with_the_implicit_cfg_reward(monkeypatch):
    """Full mode under bf16: the frozen reference is stored in bf16 too, and a run whose reward evaluates that
    reference (implicit CFG: its passes run under autocast like every other) is bit-identical to casting on the
    fly."""
    from diffinstruct import assembly
    from diffinstruct import trainer as trainer_module
    from diffinstruct.denoisers import EDMDenoiser
    from diffinstruct.rewards import ImplicitCFGReward

    def build(store: bool):
        torch.manual_seed(0)
        teacher = EDMDenoiser(toy.MLPNet(2, 4, 32))
        models = assembly.build_models(teacher, (2,), mode="full", sigma_init=2.5)
        with monkeypatch.context() as patch:
            if not store:
                patch.setattr(trainer_module, "store_frozen_in", lambda module, dtype: 0)
            cfg = DIConfig(**{**BASE, "bf16": True})
            return models, DITrainer(cfg, models, toy.class_prompts(4), ImplicitCFGReward(models.reference))

    (models, stored), (_, cast) = build(True), build(False)
    linears = [m for m in models.reference.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    for step in range(3):
        stored.train_step(step)
        cast.train_step(step)
    a, b = full_state(stored), full_state(cast)
    assert all(torch.equal(a[k], b[k]) for k in a)
