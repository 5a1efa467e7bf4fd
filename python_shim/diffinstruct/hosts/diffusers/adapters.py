"""diffusers networks as the engine's denoisers: the adapters F(x, t, cond) that a VP or flow Denoiser wraps, the
denoiser builders per model kind, activation checkpointing that is correct with LoRA roles, and LoRA targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import kernels
from ...denoisers import FlowDenoiser, VPDenoiser
from ...recompute import role_aware_checkpoint
from .conditioning import _cond_dict, _fit, _model_dtype, _no_extra, _take
from .schedules import PREDICTIONS, _scheduler_dict, prediction_type, sigmas_from_scheduler_config

VAE_SCALE_FACTOR = 8  # pixels per latent element (SD, SDXL, PixArt, SD3)


def _host_models(module: nn.Module) -> list[nn.Module]:
    """The diffusers models inside `module` (outermost first; nested ones skipped)."""
    found: list[nn.Module] = []
    for m in module.modules():
        if hasattr(m, "_supports_gradient_checkpointing") and hasattr(m, "enable_gradient_checkpointing"):
            if not any(m is not f and any(m is x for x in f.modules()) for f in found):
                found.append(m)
    return found


def supports_gradient_checkpointing(module: nn.Module) -> bool:
    models = _host_models(module)
    return bool(models) and all(bool(m._supports_gradient_checkpointing) for m in models)


def set_gradient_checkpointing(module: nn.Module, enable: bool = True) -> bool:
    """Turn activation checkpointing of the diffusers model(s) inside `module` on or off.

    Returns whether checkpointing is now on (False where the model does not support it). The
    checkpoint function is role-aware, so it is correct with LoRA on a shared base as well.
    """
    models = _host_models(module)
    if not models or not supports_gradient_checkpointing(module):
        return False
    for m in models:
        if enable:
            m.enable_gradient_checkpointing(role_aware_checkpoint)
        else:
            m.disable_gradient_checkpointing()
    return enable


def gradient_checkpointing_enabled(module: nn.Module) -> bool:
    models = _host_models(module)
    return bool(models) and all(bool(getattr(m, "is_gradient_checkpointing", False)) for m in models)


class DiffusersNet(nn.Module):
    """The network F(x, t, cond) a Denoiser wraps; holds the diffusers model as `.model`."""

    kind: str = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return _model_dtype(self.model)

    def enable_gradient_checkpointing(self, enable: bool = True) -> bool:
        """Activation checkpointing on (or off); returns whether it is now on (False: not supported)."""
        return set_gradient_checkpointing(self.model, enable)

    def disable_gradient_checkpointing(self) -> None:
        set_gradient_checkpointing(self.model, False)

    @property
    def gradient_checkpointing(self) -> bool:
        return gradient_checkpointing_enabled(self.model)


class UNetNet(DiffusersNet):
    """UNet2DConditionModel: (x_vp, DDPM timestep, cond) -> eps or v."""

    kind = "unet"
    CONDITIONING = ("encoder_hidden_states", "added_cond_kwargs", "text_embeds", "time_ids", "encoder_attention_mask",
                    "timestep_cond", "class_labels")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        parts = _cond_dict(cond)
        dtype, device, batch = self.dtype, x.device, x.shape[0]
        ehs = _fit(_take(parts, "encoder_hidden_states", "UNet2DConditionModel"), batch, dtype, device,
                   "encoder_hidden_states")
        added = dict(parts.pop("added_cond_kwargs", None) or {})
        for key in ("text_embeds", "time_ids"):
            if key in parts:
                added[key] = parts.pop(key)
        extra = {k: _fit(parts.pop(k), batch, dtype, device, k)
                 for k in ("encoder_attention_mask", "timestep_cond", "class_labels") if k in parts}
        _no_extra(parts, "UNet2DConditionModel", self.CONDITIONING)
        if getattr(self.model.config, "addition_embed_type", None) == "text_time":
            missing = [k for k in ("text_embeds", "time_ids") if added.get(k) is None]
            if missing:
                raise ValueError(f"this UNet (SDXL-style, addition_embed_type='text_time') needs "
                                 f"added_cond_kwargs {', '.join(missing)} in the conditioning")
        out = self.model(x.to(dtype), t, encoder_hidden_states=ehs,
                         added_cond_kwargs=_fit(added, batch, dtype, device, "added_cond_kwargs") if added else None,
                         return_dict=False, **extra)[0]
        return out


class PixArtNet(DiffusersNet):
    """PixArt-alpha transformer: (x_vp, DDPM timestep, cond) -> eps; the learned-variance channels dropped."""

    kind = "pixart"
    CONDITIONING = ("encoder_hidden_states", "encoder_attention_mask", "added_cond_kwargs")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        parts = _cond_dict(cond)
        dtype, device, batch = self.dtype, x.device, x.shape[0]
        ehs = _fit(_take(parts, "encoder_hidden_states", "PixArt"), batch, dtype, device, "encoder_hidden_states")
        mask = _fit(parts.pop("encoder_attention_mask", None), batch, dtype, device, "encoder_attention_mask")
        added = dict(parts.pop("added_cond_kwargs", None) or {})
        _no_extra(parts, "PixArt", self.CONDITIONING)
        if getattr(self.model, "use_additional_conditions", False):
            h, w = x.shape[-2] * VAE_SCALE_FACTOR, x.shape[-1] * VAE_SCALE_FACTOR
            if added.get("resolution") is None:
                added["resolution"] = torch.tensor([[float(h), float(w)]], device=device)
            if added.get("aspect_ratio") is None:
                added["aspect_ratio"] = torch.tensor([[float(h / w)]], device=device)
            added = _fit(added, batch, dtype, device, "added_cond_kwargs")
        else:
            added = {"resolution": None, "aspect_ratio": None}
        out = self.model(x.to(dtype), encoder_hidden_states=ehs, timestep=t, added_cond_kwargs=added,
                         encoder_attention_mask=mask, return_dict=False)[0]
        return out[:, : x.shape[1]]  # 8 channels = eps and the learned variance; keep eps


class SD3Net(DiffusersNet):
    """SD3 transformer: (x_t, sigma, cond) -> v = eps - x0 at timestep num_train_timesteps * sigma."""

    kind = "sd3"
    CONDITIONING = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, model: nn.Module, num_train_timesteps: int = 1000) -> None:
        super().__init__(model)
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        parts = _cond_dict(cond)
        dtype, device, batch = self.dtype, x.device, x.shape[0]
        ehs = _fit(_take(parts, "encoder_hidden_states", "SD3"), batch, dtype, device, "encoder_hidden_states")
        pooled = _fit(_take(parts, "pooled_projections", "SD3"), batch, dtype, device, "pooled_projections")
        _no_extra(parts, "SD3", self.CONDITIONING)
        timestep = sigma.to(device=device, dtype=torch.float32) * self.num_train_timesteps
        return self.model(hidden_states=x.to(dtype), encoder_hidden_states=ehs, pooled_projections=pooled,
                          timestep=timestep, return_dict=False)[0]


def unet_denoiser(unet: nn.Module, scheduler: Any = None, *, prediction: str | None = None,
                  sigmas: np.ndarray | None = None) -> VPDenoiser:
    """A UNet2DConditionModel as an EDM denoiser; the table and eps/v come from the scheduler config.

    Without a scheduler config: the SD1.5 "scaled_linear" table and eps prediction.
    """
    config = _scheduler_dict(scheduler)
    table = sigmas if sigmas is not None else (sigmas_from_scheduler_config(config) if config
                                               else kernels.sigma_table("scaled_linear"))
    pred = PREDICTIONS.get(prediction, prediction) if prediction is not None else prediction_type(config)
    return VPDenoiser(UNetNet(unet), table, pred)  # type: ignore[arg-type]


def pixart_denoiser(transformer: nn.Module, scheduler: Any = None, *, prediction: str | None = None,
                    sigmas: np.ndarray | None = None) -> VPDenoiser:
    """PixArt-alpha as an EDM denoiser on the iddpm_linear table (SIM's PixArt wrapper), eps prediction.

    A scheduler config only sets the table's length and beta range (its linear schedule).
    """
    config = _scheduler_dict(scheduler)
    if sigmas is None:
        schedule = {k: float(config[k]) for k in ("beta_start", "beta_end") if k in config}
        sigmas = kernels.sigma_table("iddpm_linear", int(config.get("num_train_timesteps", 1000)), **schedule)
    pred = PREDICTIONS.get(prediction, prediction) if prediction is not None else prediction_type(config)
    return VPDenoiser(PixArtNet(transformer), sigmas, pred)  # type: ignore[arg-type]


def sd3_denoiser(transformer: nn.Module, scheduler: Any = None, *, sigma_min: float = 1e-3,
                 sigma_max: float = 1.0 - 1e-3) -> FlowDenoiser:
    """SD3 as a rectified-flow denoiser; the timestep scale is the scheduler's num_train_timesteps."""
    config = _scheduler_dict(scheduler)
    net = SD3Net(transformer, int(config.get("num_train_timesteps", 1000)))
    return FlowDenoiser(net, sigma_min=sigma_min, sigma_max=sigma_max)


DENOISERS: dict[str, Callable[..., nn.Module]] = {"unet": unet_denoiser, "pixart": pixart_denoiser,
                                                  "sd3": sd3_denoiser}


def host_model(denoiser: nn.Module) -> nn.Module:
    """The diffusers model inside a denoiser built here."""
    models = _host_models(denoiser)
    if not models:
        raise ValueError(f"no diffusers model inside this {type(denoiser).__name__}")
    return models[0]


ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def attention_and_conv_target(name: str, module: nn.Module) -> bool:
    """LoRA on the attention projections (q, k, v, out; SD3's context projections too) and every dense conv."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    if isinstance(module, nn.Linear):
        parts = name.split(".")
        return parts[-1] in ATTENTION_LINEARS or (len(parts) >= 2 and parts[-2] == "to_out" and parts[-1] == "0")
    return False


def attention_target(name: str, module: nn.Module) -> bool:
    """LoRA on the attention projections only."""
    return isinstance(module, nn.Linear) and attention_and_conv_target(name, module)
