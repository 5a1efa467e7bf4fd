"""The one engine builder (engine.py): configs from every host's description, seeded assembly, the trainer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffinstruct import engine
from diffinstruct.comfyui.specs import LossSpec, ReferenceSpec, RewardSpec, RewardTerm, TASpec
from diffinstruct.comfyui.training import TrainOptions
from diffinstruct.config import DIConfig
from diffinstruct.denoisers import EDMDenoiser
from diffinstruct.errors import ConfigError
from diffinstruct.rewards import TargetReward
from diffinstruct.toy import GaussianMixture, MLPNet, build_models, class_prompts, default_means
from diffinstruct.trainer import DITrainer
from engine_helpers import full_state


def loss_spec(**kw) -> LossSpec:
    ref = ReferenceSpec(None, None, None, kw.pop("omega", 3.5))
    return LossSpec(ref, TASpec("lora", 4, kw.pop("lr_ta", 2e-3)), RewardSpec([RewardTerm(1.0, "brightness")]),
                    **{"alpha": 7.0, "method": "DI*", "weighting": "unit", "p_mean": -1.5, "p_std": 1.7, **kw})


def test_comfy_specs_become_the_config_they_describe():
    loss = loss_spec()
    opts = TrainOptions(steps=3, checkpoint_dir="x", batch_size=3, lr_generator=3e-4, seed=9, bf16=True)
    expected = DIConfig(method="distar", alpha=7.0, omega=3.5, p_mean=-1.5, p_std=1.7, generator_weighting="unit",
                        lr_generator=3e-4, lr_ta=2e-3, batch_size=3, seed=9, bf16=True, sigma_init=1.25)
    assert engine.trainer_config(loss, opts, sigma_init=1.25) == expected
    # every other option keeps DIConfig's default, and the host's own defaults carry through
    defaults = engine.trainer_config(loss_spec(method="DI++"), TrainOptions(steps=1, checkpoint_dir="x"))
    assert (defaults.method, defaults.batch_size, defaults.lr_generator, defaults.seed, defaults.bf16) == (
        "dipp", 1, 1e-4, 0, False)
    assert defaults.ema_decay == DIConfig().ema_decay and defaults.sigma_init is None


def test_config_sources_merge_in_order_and_are_validated():
    base = DIConfig(alpha=0.5, batch_size=8)
    cfg = engine.trainer_config(base, {"batch_size": 2}, seed=4)
    assert (cfg.alpha, cfg.batch_size, cfg.seed) == (0.5, 2, 4)
    assert base.batch_size == 8  # the source is not changed
    with pytest.raises(ConfigError, match="unknown option.*nonsense"):
        engine.trainer_config({"nonsense": 1})
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        engine.trainer_config(base, batch_size=0)
    with pytest.raises(ConfigError, match="cannot read training options from a int"):
        engine.trainer_config(3)


def test_a_spec_names_its_options_in_field_metadata():
    # a host field that is not a training option (TA mode, LoRA rank, image size) never reaches DIConfig
    named = {f.name for f in dataclasses.fields(TrainOptions) if f.metadata}
    assert named == {"batch_size", "lr_generator", "seed", "bf16", "ema_decay"}
    assert engine.trainer_config(loss_spec(alpha=0.0, method="DI")).alpha == 0.0


def test_build_engine_is_the_trainer_the_constructor_makes():
    cfg = DIConfig(method="dipp", batch_size=16, lr_generator=1e-3, lr_ta=1e-3, alpha=0.1, seed=3)

    def models():
        return build_models(GaussianMixture(default_means(4), 0.05), hidden=16, seed=0)

    reward = TargetReward(torch.tensor([1.0, 1.0]))
    built = engine.build_engine(models(), class_prompts(4), cfg, reward)
    by_hand = DITrainer(cfg, models(), class_prompts(4), reward=reward)
    assert built.cfg is cfg and built.reward is reward and built.ddp is None
    for step in range(3):
        assert built.train_step(step)["ta_loss"] == by_hand.train_step(step)["ta_loss"]
    a, b = full_state(built), full_state(by_hand)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "counters")
    from_mapping = engine.build_engine(models(), class_prompts(4), {"alpha": 0.1, "seed": 3}, reward, rank=1,
                                       world_size=2)
    assert (from_mapping.cfg.alpha, from_mapping.rank, from_mapping.world_size) == (0.1, 1, 2)
    with pytest.raises(RuntimeError, match="no process group"):  # world_size 2 without torchrun
        engine.build_engine(models(), class_prompts(4), cfg, reward, world_size=2, data_parallel=True)


def test_seeded_assembly_is_reproducible_and_leaves_the_global_stream():
    def teacher() -> EDMDenoiser:
        torch.manual_seed(0)
        return EDMDenoiser(MLPNet(2, 4, 16))

    def lora(models) -> list[torch.Tensor]:
        return [p.detach().clone() for p in models.generator_params + models.ta_params]

    t = teacher()
    torch.manual_seed(123)
    first = engine.assemble(t, (2,), mode="shared", rank=2, sigma_init=2.5, seed=7)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)  # assemble(seed=...) drew nothing from the global stream
    second = engine.assemble(teacher(), (2,), mode="shared", rank=2, sigma_init=2.5, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(lora(first), lora(second), strict=True))
    other = engine.assemble(teacher(), (2,), mode="shared", rank=2, sigma_init=2.5, seed=8)
    assert not all(torch.equal(x, y) for x, y in zip(lora(first), lora(other), strict=True))
    full = engine.assemble(teacher(), (2,), mode="full", sigma_init=2.5, device="cpu")
    assert full.generator.sigma_init == 2.5 and all(p.device.type == "cpu" for p in full.generator_params)
