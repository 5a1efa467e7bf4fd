"""The diffusers host: tiny random models saved and loaded back through our local-only loaders.

Covers UNet2DConditionModel (SD1.5-style and SDXL-style), PixArt-alpha (PixArtTransformer2DModel and the
legacy Transformer2DModel) and SD3Transformer2DModel: output shapes, the VP eps/v algebra against a direct
computation and against diffusers' own DDPMScheduler, the timestep the network sees, error messages
naming the missing path, DI++ train steps in both memory modes, and gradient checkpointing (role-aware
with a shared LoRA base).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from diffinstruct import cli, kernels  # noqa: E402
from diffinstruct.assembly import build_models  # noqa: E402
from diffinstruct.config import DIConfig  # noqa: E402
from diffinstruct.denoisers import FlowDenoiser, VPDenoiser  # noqa: E402
from diffinstruct.hosts import diffusers as H  # noqa: E402
from diffinstruct.prompts import PromptList  # noqa: E402
from diffinstruct.rewards import TargetReward  # noqa: E402
from diffinstruct.trainer import DITrainer  # noqa: E402

LATENT = (4, 8, 8)
TEXT_DIM = 16

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
            norm_num_groups=8)
SDXL = dict(UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=12 + 6 * 8)
PIXART = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
              cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, norm_num_groups=8)
# sample_size 128 turns on PixArt's resolution / aspect-ratio conditioning (inner dim must divide by 3)
PIXART_1024 = dict(PIXART, num_attention_heads=3, cross_attention_dim=24, sample_size=128)
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
           pos_embed_max_size=16)
CONFIGS = {"unet": ("unet", UNET), "sdxl": ("unet", SDXL), "pixart": ("pixart", PIXART),
           "pixart1024": ("pixart", PIXART_1024), "sd3": ("sd3", SD3)}
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "clip_sample": False}


pytestmark = pytest.mark.usefixtures("one_thread")




def cond_for(name: str, batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)}
    if name == "sdxl":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 12, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)}
    if name == "sd3":
        cond["pooled_projections"] = torch.randn(batch, 8, generator=g)
    return cond


def denoiser_for(name: str, model: nn.Module, scheduler: dict | None = None) -> nn.Module:
    kind = CONFIGS[name][0]
    return H.DENOISERS[kind](model, scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny model saved with save_pretrained into its own folder: {name: (folder, original model)}."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, (kind, config) in CONFIGS.items():
        model = H.build_model(kind, config, seed=1)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ============================================================================================== loading + shapes
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_back_and_output_shape(saved, name, no_network):
    folder, original = saved[name]
    kind = CONFIGS[name][0]
    loaded = H.load_model(folder, kind)
    assert same_weights(original, loaded)
    assert H.detect_kind(folder) == kind
    d = denoiser_for(name, loaded)
    assert isinstance(d, FlowDenoiser if kind == "sd3" else VPDenoiser)
    x = torch.randn(2, *LATENT)
    sigma = torch.tensor([0.3, 0.7]) if kind == "sd3" else torch.tensor([0.1, 2.5])
    with torch.no_grad():
        out = d(x, sigma, cond_for(name, batch=2))
        one = d(x, sigma, cond_for(name, batch=1))  # batch-1 conditioning broadcasts
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert one.shape == x.shape


def test_named_loaders_and_legacy_pixart(tmp_path, saved, no_network):
    assert same_weights(H.load_unet(saved["unet"][0]), saved["unet"][1])
    assert same_weights(H.load_pixart_transformer(saved["pixart"][0]), saved["pixart"][1])
    assert same_weights(H.load_sd3_transformer(saved["sd3"][0]), saved["sd3"][1])
    legacy = diffusers.Transformer2DModel(norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                          num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
                                          attention_bias=True, **PIXART)
    legacy.save_pretrained(tmp_path / "legacy")
    assert json.loads((tmp_path / "legacy" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    loaded = H.load_pixart_transformer(tmp_path / "legacy")
    assert type(loaded).__name__ == "PixArtTransformer2DModel"
    assert same_weights(legacy, loaded)


def test_pipeline_folder_with_scheduler(tmp_path, saved, no_network):
    pipe = tmp_path / "pipe"
    saved["unet"][1].save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    d = H.load_denoiser(pipe)
    assert isinstance(d, VPDenoiser) and d.prediction == "eps"
    np.testing.assert_allclose(d.sigmas.numpy(), kernels.sigma_table("scaled_linear"), rtol=1e-6)
    assert same_weights(H.host_model(d), saved["unet"][1])
    # v prediction comes from the scheduler config; the model's own folder also finds ../scheduler
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD15_SCHEDULER,
                                                                          "prediction_type": "v_prediction"}))
    assert H.load_denoiser(pipe / "unet").prediction == "v"
    assert H.load_denoiser(pipe, scheduler=SD15_SCHEDULER).prediction == "eps"


def test_single_safetensors_file(tmp_path, saved, no_network):
    from safetensors.torch import save_file

    folder, model = saved["unet"]
    config = json.loads((folder / "config.json").read_text())
    file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    with pytest.raises(FileNotFoundError) as err:
        H.load_unet(file)
    assert str(tmp_path / "unet.json") in str(err.value) and str(tmp_path / "config.json") in str(err.value)
    assert same_weights(H.load_unet(file, config=config), model)
    assert same_weights(H.load_unet(file, config=folder / "config.json"), model)
    (tmp_path / "unet.json").write_text(json.dumps(config))
    loaded = H.load_unet(file, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    bad = tmp_path / "ldm.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="original"):
        H.load_unet(bad, config=config)


# ============================================================================================== errors name the path
def test_missing_files_are_named(tmp_path, saved, no_network):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        H.load_unet(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "config.json")):
        H.load_unet(empty)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((saved["unet"][0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as err:
        H.load_unet(only_config)
    assert str(only_config / "diffusion_pytorch_model.safetensors") in str(err.value)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(pipe / "transformer")):
        H.load_sd3_transformer(pipe)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        H.load_scheduler_config(pipe)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "prompts.safetensors")):
        H.load_prompt_embeddings(tmp_path / "prompts.safetensors")
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        H.load_unet(saved["pixart"][0])


def test_bad_conditioning_is_named(saved):
    d = denoiser_for("sdxl", saved["sdxl"][1])
    x = torch.randn(1, *LATENT)
    with pytest.raises(ValueError, match="time_ids"):
        d(x, torch.tensor([1.0]), {"encoder_hidden_states": torch.randn(1, 5, TEXT_DIM),
                                   "added_cond_kwargs": {"text_embeds": torch.randn(1, 12)}})
    with pytest.raises(ValueError, match="pooled_projections"):
        denoiser_for("sd3", saved["sd3"][1])(x, torch.tensor([0.5]), {"encoder_hidden_states": torch.randn(1, 5, 16)})
    with pytest.raises(ValueError, match="promt_embeds"):
        denoiser_for("unet", saved["unet"][1])(x, torch.tensor([1.0]), {**cond_for("unet"), "promt_embeds": x})


# ============================================================================================== the VP algebra
def direct_unet(unet: nn.Module, x: torch.Tensor, t: int, cond: dict) -> torch.Tensor:
    return unet(x, torch.tensor([t]), encoder_hidden_states=cond["encoder_hidden_states"]).sample


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_vp_algebra_against_direct_computation(saved, prediction):
    unet = saved["unet"][1]
    scheduler = {**SD15_SCHEDULER, "prediction_type": "epsilon" if prediction == "eps" else "v_prediction"}
    d = H.unet_denoiser(unet, scheduler)
    assert d.prediction == prediction
    table = kernels.sigma_table("scaled_linear")
    cond = cond_for("unet")
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))
    for s in (0.05, 0.5, 2.5, 9.0):
        t = int(np.argmin(np.abs(table - s)))
        with torch.no_grad():
            out = direct_unet(unet, x / math.sqrt(1 + s * s), t, cond)
            got = d(x, torch.tensor([s]), cond)
        if prediction == "eps":
            want = x - s * out
        else:
            want = x / (1 + s * s) - s / math.sqrt(1 + s * s) * out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_diffusers_ddpm_scheduler(saved, prediction_type):
    """At sigma on the table, D(x) equals DDPMScheduler's pred_original_sample for x_vp = x / sqrt(1 + sigma^2)."""
    unet = saved["unet"][1]
    config = {**SD15_SCHEDULER, "prediction_type": prediction_type}
    scheduler = diffusers.DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    d = H.unet_denoiser(unet, config)
    cond = cond_for("unet")
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(6))
    for t in (10, 300, 625, 999):
        s = float(d.sigmas[t])
        x_vp = x / math.sqrt(1 + s * s)
        with torch.no_grad():
            out = direct_unet(unet, x_vp, t, cond)
            want = scheduler.step(out, t, x_vp, generator=torch.Generator().manual_seed(0)).pred_original_sample
            got = d(x, torch.tensor([s]), cond)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sigma_tables_from_scheduler_configs():
    np.testing.assert_allclose(H.sigmas_from_scheduler_config(SD15_SCHEDULER), kernels.sigma_table("scaled_linear"))
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config = {**SD15_SCHEDULER, "beta_schedule": schedule}
        if schedule == "linear":
            config.update(beta_start=0.0001, beta_end=0.02)
        ddpm = diffusers.DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
        sigma = H.sigmas_from_scheduler_config(config)
        # abar = 1 / (1 + sigma^2); diffusers keeps it in float32
        np.testing.assert_allclose(1 / (1 + sigma**2), ddpm.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-7)
    zero_snr = H.sigmas_from_scheduler_config({**SD15_SCHEDULER, "rescale_betas_zero_snr": True})
    assert np.isfinite(zero_snr).all() and np.all(np.diff(zero_snr) > 0) and zero_snr[-1] == pytest.approx(4096.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        H.sigmas_from_scheduler_config({"beta_schedule": "exp"})
    with pytest.raises(ValueError, match="prediction_type"):
        H.unet_denoiser(nn.Identity(), {**SD15_SCHEDULER, "prediction_type": "sample"})


def test_pixart_uses_iddpm_table_and_drops_learned_sigma(saved):
    model = saved["pixart"][1]
    d = H.pixart_denoiser(model)
    np.testing.assert_allclose(d.sigmas.numpy(), kernels.sigma_table("iddpm_linear"), rtol=1e-6)
    assert d.sigma_max == pytest.approx(156.6155, rel=1e-5) and d.sigma_min == pytest.approx(0.0100, rel=1e-3)
    cond = cond_for("pixart")
    x = torch.randn(1, *LATENT)
    s = 2.5
    t = int(d.timestep(torch.tensor([s])))
    assert t == 440  # docs/ALGORITHM.md section 3: sigma_init 2.5 -> DDPM t = 440 on PixArt's table
    with torch.no_grad():
        full = model(x / math.sqrt(1 + s * s), encoder_hidden_states=cond["encoder_hidden_states"],
                     timestep=torch.tensor([t]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        got = d(x, torch.tensor([s]), cond)
    assert full.shape[1] == 8
    torch.testing.assert_close(got, x - s * full[:, :4], rtol=1e-5, atol=1e-5)


# ============================================================================================== timesteps seen
def capture_timesteps(model: nn.Module) -> list:
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"] if "timestep" in kwargs else args[1])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", ["unet", "sdxl", "pixart", "pixart1024"])
def test_timestep_is_the_snapped_table_index(saved, name):
    model = H.build_model(*CONFIGS[name], seed=2)
    d = denoiser_for(name, model)
    seen = capture_timesteps(model)
    sigma = torch.tensor([0.001, 0.5, 2.5, 200.0])
    with torch.no_grad():
        d(torch.randn(4, *LATENT), sigma, cond_for(name, batch=4))
    table = d.sigmas.numpy()
    want = [int(np.argmin(np.abs(table - s))) for s in sigma.tolist()]
    assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == want
    assert want[0] == 0 and want[-1] == len(table) - 1  # out-of-range sigmas clamp to the ends
    if CONFIGS[name][0] == "unet":
        assert want[2] == 625  # docs/ALGORITHM.md section 2: SD1.5 sigma 2.5 is DDPM t = 625


def test_sd3_timestep_is_scaled_sigma(saved):
    model = H.build_model("sd3", SD3, seed=2)
    d = H.sd3_denoiser(model, {"num_train_timesteps": 1000, "shift": 3.0})
    seen = capture_timesteps(model)
    sigma = torch.tensor([0.1, 0.75])
    x = torch.randn(2, *LATENT)
    cond = cond_for("sd3", batch=2)
    with torch.no_grad():
        got = d(x, sigma, cond)
        v = model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                  pooled_projections=cond["pooled_projections"], timestep=sigma * 1000).sample
    torch.testing.assert_close(seen[0], sigma * 1000)
    torch.testing.assert_close(got, x - sigma.reshape(-1, 1, 1, 1) * v, rtol=1e-5, atol=1e-5)


# ============================================================================================== DI++ train steps
def prompt_source(name: str) -> PromptList:
    table = {"": cond_for(name, seed=0), "a red cube": cond_for(name, seed=1), "a blue ball": cond_for(name, seed=2)}
    return PromptList(["a red cube", "a blue ball"], encode=table.__getitem__)


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("mode", ["full", "shared"])
@pytest.mark.parametrize("name", ["unet", "sdxl", "pixart", "sd3"])
def test_dipp_train_step_changes_the_generator(name, mode):
    model = H.build_model(*CONFIGS[name], seed=3)
    d = denoiser_for(name, model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    models = build_models(d, LATENT, mode=mode, rank=4, target=H.attention_and_conv_target)
    config = DIConfig(batch_size=2, omega=4.5, alpha=0.05, lr_generator=1e-3, lr_ta=1e-3, seed=1)
    trainer = DITrainer(config, models, prompt_source(name), reward=TargetReward(torch.zeros(LATENT)))
    gen_before, ta_before = snapshot(models.generator_params), snapshot(models.ta_params)
    metrics = trainer.train_step(0)
    assert metrics["ta_ok"] == 1.0 and metrics["generator_ok"] == 1.0
    for key in ("ta_loss", "generator_grad_norm", "reward", "time_total", "time_kernels"):
        assert math.isfinite(metrics[key]), key
    changed = [not torch.equal(a, p.detach()) for a, p in zip(gen_before, models.generator_params, strict=True)]
    assert any(changed)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(ta_before, models.ta_params, strict=True))
    # the teacher (full) / the shared base (shared: layers wrapped as <name>.base) stays as it was
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".adapters." not in n}
    assert set(after) == set(base)
    assert all(torch.equal(base[n], p.detach()) and not p.requires_grad for n, p in after.items())


def test_bf16_weights_take_float32_latents():
    model = H.build_model("unet", UNET, dtype=torch.bfloat16, seed=3)
    assert next(model.parameters()).dtype == torch.bfloat16
    d = H.unet_denoiser(model)
    x = torch.randn(1, *LATENT)
    out = d(x, torch.tensor([1.0]), cond_for("unet"))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def _bf16_trainer(name: str, mode: str, store: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[DITrainer, nn.Module]:
    from diffinstruct import trainer as trainer_module

    model = H.build_model(*CONFIGS[name], seed=3)
    models = build_models(denoiser_for(name, model), LATENT, mode=mode, rank=4, target=H.attention_and_conv_target)
    config = DIConfig(batch_size=2, omega=4.5, alpha=0.05, lr_generator=1e-3, lr_ta=1e-3, seed=1, bf16=True)
    with monkeypatch.context() as patch:
        if not store:  # the frozen weights stay float32: autocast casts them on every pass
            patch.setattr(trainer_module, "store_frozen_in", lambda module, dtype: 0)
        return DITrainer(config, models, prompt_source(name), reward=TargetReward(torch.zeros(LATENT))), model


def _frozen_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) and not m.weight.requires_grad]


@pytest.mark.parametrize("mode", ["full", "shared"])
@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_bf16_stores_the_frozen_weights_with_the_same_bits(name, mode, monkeypatch):
    """Under bf16 every frozen Linear / Conv2d weight is stored in bf16 (full mode's reference, the shared base with
    the layers that carry no adapter); training is bit-identical to autocast casting float32 weights on every pass,
    and the trainable weights stay float32."""
    from engine_helpers import full_state

    stored, model = _bf16_trainer(name, mode, True, monkeypatch)
    cast, model_cast = _bf16_trainer(name, mode, False, monkeypatch)
    assert _frozen_layers(model) and all(m.weight.dtype == torch.bfloat16 for m in _frozen_layers(model))
    assert all(m.weight.dtype == torch.float32 for m in _frozen_layers(model_cast))
    assert all(p.dtype == torch.float32 for p in stored.generator_params + stored.ta_params)
    for step in range(2):
        assert stored.train_step(step)["generator_ok"] == 1.0
        cast.train_step(step)
    a, b = full_state(stored), full_state(cast)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["full", "shared"])
@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_stored_bf16_networks_run_outside_autocast(name, mode, monkeypatch):
    """Sampling and evaluation call the networks outside autocast: the stored bf16 layers cast for themselves and
    the networks still take and return float32 (before, a bf16-trained shared UNet failed here with a dtype
    mismatch: its adapter cast the latents to the stored weights' dtype)."""
    trainer, _ = _bf16_trainer(name, mode, True, monkeypatch)
    x, sigma, cond = torch.randn(2, *LATENT), torch.tensor([0.5, 3.0]), H._stack([cond_for(name)] * 2)
    with torch.no_grad():
        outs = [trainer.models.reference(x, sigma, cond), trainer.models.ta(x, sigma, cond),
                trainer.models.generator(x, cond)]
    assert all(o.dtype == torch.float32 and bool(torch.isfinite(o).all()) for o in outs)


# ============================================================================================== gradient checkpointing
@pytest.mark.parametrize("name", ["unet", "pixart", "sd3"])
def test_gradient_checkpointing_toggles(saved, name):
    model = H.build_model(*CONFIGS[name], seed=4)
    d = denoiser_for(name, model)
    assert H.supports_gradient_checkpointing(d)
    assert not H.gradient_checkpointing_enabled(d)
    assert d.net.enable_gradient_checkpointing() is True
    assert model.is_gradient_checkpointing and d.net.gradient_checkpointing
    assert H.set_gradient_checkpointing(d, False) is False
    assert not model.is_gradient_checkpointing and not d.net.gradient_checkpointing


def test_gradient_checkpointing_unsupported_is_reported():
    class Plain(nn.Module):
        def forward(self, x, t, cond):
            return x

    d = VPDenoiser(Plain(), kernels.sigma_table("scaled_linear"))
    assert not H.supports_gradient_checkpointing(d)
    assert H.set_gradient_checkpointing(d, True) is False

    class NoCkpt(diffusers.UNet2DConditionModel):
        _supports_gradient_checkpointing = False

    model = NoCkpt(**UNET)
    assert H.set_gradient_checkpointing(H.unet_denoiser(model), True) is False
    assert not model.is_gradient_checkpointing


def lora_grads(name: str, checkpointing: bool, role: str) -> list[torch.Tensor]:
    model = H.build_model(*CONFIGS[name], seed=5)
    d = denoiser_for(name, model)
    models = build_models(d, LATENT, mode="shared", rank=4, target=H.attention_and_conv_target)
    torch.manual_seed(7)
    params = models.generator_params if role == "generator" else models.ta_params
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.05)  # non-zero adapters, so every adapter tensor gets a gradient
    if checkpointing:
        assert H.set_gradient_checkpointing(d, True)
    model.train()
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, *LATENT, generator=g)
    cond = cond_for(name, batch=2)
    if role == "generator":
        out = models.generator(z, cond)
    else:
        sigma = torch.tensor([0.2, 0.6]) if name == "sd3" else torch.tensor([0.3, 3.0])
        out = models.ta(z, sigma, cond)
    out.backward(torch.randn(out.shape, generator=g))  # after the role's `with switch.use(...)` has exited
    assert all(p.grad is not None for p in params)
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("role", ["generator", "ta"])
@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_checkpointing_is_role_aware_with_shared_lora(name, role):
    plain = lora_grads(name, False, role)
    checkpointed = lora_grads(name, True, role)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_targets():
    model = H.build_model("unet", UNET)
    names = [n for n, m in model.named_modules() if H.attention_and_conv_target(n, m)]
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("attn2.to_out.0") for n in names)
    assert any(n.endswith("conv1") for n in names) and not any(n.endswith("ff.net.2") for n in names)
    assert not any(n.endswith("time_emb_proj") for n in names)
    sd3 = H.build_model("sd3", SD3)
    assert any(n.endswith("add_q_proj") for n, m in sd3.named_modules() if H.attention_target(n, m))


# ============================================================================================== the CLI problem
def test_cli_diffusers_problem_train_eval_sample(tmp_path, saved, capsys):
    pipe = tmp_path / "pipe"
    saved["unet"][1].save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    H.save_prompt_embeddings(tmp_path / "prompts.safetensors",
                             {"": cond_for("unet", seed=0), "a cat": cond_for("unet", seed=1)})
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[run]
problem = "diffusers"
steps = 2
out_dir = "{out}"
checkpoint_every = 2
[train]
batch_size = 1
omega = 4.5
alpha = 0.1
lr_generator = 1e-3
lr_ta = 1e-3
[diffusers]
model = "{pipe}"
embeddings = "{tmp_path / 'prompts.safetensors'}"
mode = "shared"
lora_rank = 4
latent_size = 8
gradient_checkpointing = true
[reward]
name = "latent_target"
value = 0.0
""")
    assert cli.main(["train", "--config", str(toml), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out), "--n", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and report["finite_fraction"] == 1.0 and math.isfinite(report["reward_mean"])
    assert cli.main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "x.npy"), "--n", "2"]) == 0
    assert np.load(tmp_path / "x.npy").shape == (2, *LATENT)
    toml.write_text(toml.read_text().replace(str(pipe), str(tmp_path / "missing")))
    assert cli.main(["train", "--config", str(toml)]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_prompt_embeddings_round_trip(tmp_path):
    table = {"": cond_for("sdxl", seed=0), "a dog": cond_for("sdxl", seed=1)}
    H.save_prompt_embeddings(tmp_path / "e.safetensors", table)
    back = H.load_prompt_embeddings(tmp_path / "e.safetensors")
    assert list(back) == ["", "a dog"]
    torch.testing.assert_close(back["a dog"]["added_cond_kwargs"]["time_ids"],
                               table["a dog"]["added_cond_kwargs"]["time_ids"])
    torch.testing.assert_close(back[""]["encoder_hidden_states"], table[""]["encoder_hidden_states"])


def test_hosts_package_imports_no_host_library():
    import subprocess
    import sys

    code = "import sys, diffinstruct.hosts; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
