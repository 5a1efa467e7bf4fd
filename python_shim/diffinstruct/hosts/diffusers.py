"""diffusers models as the engine's denoisers D(x, sigma, cond), loaded from local files only.

    UNet2DConditionModel (SD1.5, SD2.x, SDXL)       -> VPDenoiser, eps or v from the scheduler config
    PixArt-alpha PixArtTransformer2DModel
        (or the legacy Transformer2DModel)           -> VPDenoiser on the iddpm_linear table; of its
                                                        8 output channels the first 4 are kept
    SD3Transformer2DModel                            -> FlowDenoiser, timestep = num_train_timesteps * sigma

VP models: the table index that `VPDenoiser.timestep` snaps sigma to *is* the DDPM timestep (the
tables are ascending in timestep), so it goes to the network unchanged (docs/ALGORITHM.md section 2).

Conditioning is a dict of tensors, batch first (a bare tensor is taken as encoder_hidden_states):
    encoder_hidden_states   [B, L, D]  every model
    added_cond_kwargs       SDXL: {"text_embeds": [B, 1280], "time_ids": [B, 6]} (flat keys accepted too);
                            PixArt at 1024 px: {"resolution": [B, 2], "aspect_ratio": [B, 1]}, filled in
                            from the latent size when absent
    pooled_projections      [B, P]     SD3
    encoder_attention_mask  [B, L]     optional (PixArt, UNet)
A conditioning with batch 1 is broadcast to the batch of x. Floating tensors are cast to the model's
dtype (so bf16 weights take float32 latents); outputs come back in the latents' dtype.

Nothing here downloads: loaders take a local path (a model folder with config.json and weights, a
pipeline folder with model_index.json and a unet/ or transformer/ subfolder, or one .safetensors file
in diffusers layout plus its config.json) and pass local_files_only=True; a missing file raises
FileNotFoundError naming the path that was expected. `register` adds the "diffusers" problem to the
CLI's registry (done on import).

Images: `load_vae` reads a local AutoencoderKL (or AutoencoderTiny, TAESD) the same way; `VAEDecoder` is its
frozen, differentiable decode, images = (vae.decode(z / scaling_factor + shift_factor) + 1) / 2, which
rewards.LatentToImageReward wraps so that image rewards (`train --reward SPEC`) reach the generator's latents
and `evaluate --checkpoint` can score the generator's images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from .. import kernels
from ..denoisers import FlowDenoiser, VPDenoiser
from ..lora import LoRALayer, RoleSwitch

Kind = Literal["unet", "pixart", "sd3"]
KINDS: tuple[str, ...] = ("unet", "pixart", "sd3")

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
SUBFOLDERS: dict[str, str] = {"unet": "unet", "pixart": "transformer", "sd3": "transformer"}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "pixart": ("PixArtTransformer2DModel", "Transformer2DModel"),
    "sd3": ("SD3Transformer2DModel",),
}
PREDICTIONS = {"epsilon": "eps", "eps": "eps", "v_prediction": "v", "v": "v"}
VAE_SCALE_FACTOR = 8  # pixels per latent element (SD, SDXL, PixArt, SD3)

PathLike = str | os.PathLike


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the diffusers host needs the `diffusers` package: pip install diffusers") from exc
    return diffusers


# ============================================================================================== conditioning
def _cond_dict(cond: Any) -> dict[str, Any]:
    if isinstance(cond, torch.Tensor):
        return {"encoder_hidden_states": cond}
    if isinstance(cond, Mapping):
        return dict(cond)
    raise TypeError(f"conditioning must be a tensor (encoder_hidden_states) or a dict of tensors, "
                    f"got {type(cond).__name__}")


def _fit(t: Any, batch: int, dtype: torch.dtype, device: torch.device, name: str) -> Any:
    """Cast floating tensors to the model's dtype and device; broadcast a batch of 1 to `batch`."""
    if t is None:
        return None
    if isinstance(t, Mapping):
        return {k: _fit(v, batch, dtype, device, f"{name}.{k}") for k, v in t.items()}
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 0 or t.shape[0] not in (1, batch):
        raise ValueError(f"conditioning {name} has batch {tuple(t.shape)[:1] or '()'}; expected {batch} or 1")
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _take(parts: dict[str, Any], key: str, model: str) -> Any:
    if key not in parts or parts[key] is None:
        raise ValueError(f"{model} conditioning needs {key!r}; got keys {sorted(parts)}")
    return parts.pop(key)


def _no_extra(parts: dict[str, Any], model: str, allowed: Sequence[str]) -> None:
    if parts:
        raise ValueError(f"unknown conditioning key(s) {', '.join(sorted(parts))} for {model}; "
                         f"valid keys: {', '.join(allowed)}")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ============================================================================================== checkpointing
def _switches_in(module: nn.Module) -> list[RoleSwitch]:
    seen: dict[int, RoleSwitch] = {}
    for m in module.modules():
        if isinstance(m, LoRALayer):
            seen.setdefault(id(m.switch), m.switch)
    return list(seen.values())


def role_aware_checkpoint(module: nn.Module, *args: Any) -> Any:
    """torch.utils.checkpoint that recomputes under the LoRA roles active in the forward pass.

    With a shared LoRA base (lora.RoleSwitch), backward runs after the role's `with switch.use(...)`
    has exited; plain checkpointing would recompute the block as the bare base and silently give the
    adapters wrong (or no) gradients. This captures the roles at forward time and restores them
    around the recomputation.
    """
    switches = _switches_in(module)
    if not switches:
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
    roles = [s.active for s in switches]

    def run(*inner: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for switch, role in zip(switches, roles, strict=True):
                stack.enter_context(switch.use(role))
            return module(*inner)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


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


# ============================================================================================== networks
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


# ============================================================================================== schedules
def _scheduler_dict(scheduler: Any) -> dict[str, Any]:
    """A scheduler config from None, a dict, a diffusers scheduler (its .config) or a local path."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    if isinstance(scheduler, str | os.PathLike):
        return load_scheduler_config(scheduler)
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"scheduler must be a path, a dict or a diffusers scheduler, got {type(scheduler).__name__}")


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """diffusers' rescale_betas_zero_snr on alpha-bar (Lin et al. 2023, algorithm 1)."""
    s = np.sqrt(alphas_cumprod)
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * s0 / (s0 - s_last)
    return s**2


def sigmas_from_scheduler_config(config: Mapping[str, Any]) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) by DDPM timestep t, ascending, from a scheduler config.

    "scaled_linear" goes through kernels.sigma_table (the engine's own table); "linear",
    "squaredcos_cap_v2" and trained_betas are computed here. With rescale_betas_zero_snr the last
    abar is set to 2^-24, as diffusers does, so the table stays finite.
    """
    n = int(config.get("num_train_timesteps", 1000))
    schedule = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    trained = config.get("trained_betas")
    if trained is None and schedule == "scaled_linear" and not zero_snr:
        return np.asarray(kernels.sigma_table("scaled_linear", n, beta_start=start, beta_end=end), dtype=np.float64)
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(math.sqrt(start), math.sqrt(end), n, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; use linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas")
    abar = np.cumprod(1.0 - betas)
    if zero_snr:
        abar = _rescale_zero_terminal_snr(abar)
        abar[-1] = 2.0**-24
    return np.sqrt((1.0 - abar) / abar)


def prediction_type(config: Mapping[str, Any], default: str = "eps") -> Literal["eps", "v"]:
    """'eps' or 'v' from a scheduler config's prediction_type (default when absent)."""
    value = config.get("prediction_type", default)
    if value not in PREDICTIONS:
        raise ValueError(f"prediction_type {value!r} is not supported; use epsilon or v_prediction")
    return PREDICTIONS[value]  # type: ignore[return-value]


# ============================================================================================== denoisers
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


# ============================================================================================== LoRA targets
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


# ============================================================================================== loaders
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _weight_names(variant: str | None) -> list[str]:
    if not variant:
        return list(WEIGHT_NAMES)
    out = []
    for name in WEIGHT_NAMES:
        stem, _, rest = name.partition(".")
        out.append(f"{stem}.{variant}.{rest}")
    return out + list(WEIGHT_NAMES)


def _layout(what: str, sub: str) -> str:
    return (f"a diffusers {what} folder ({CONFIG_NAME} + {WEIGHT_NAMES[0]}), a pipeline folder ({MODEL_INDEX_NAME} "
            f"+ {sub}/), or a .safetensors file with its {CONFIG_NAME}")


def resolve_model_path(path: PathLike, kind: str, variant: str | None = None) -> tuple[Path, Path | None]:
    """(model folder, None) or (single weights file, None): raises FileNotFoundError naming what is missing."""
    if kind not in SUBFOLDERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sub = SUBFOLDERS[kind]
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected {_layout(kind, sub)}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: a single-file model must be a .safetensors file in diffusers layout")
        return p, p
    folder = p
    if not (folder / CONFIG_NAME).is_file():
        if (p / sub).is_dir():
            folder = p / sub
        elif (p / MODEL_INDEX_NAME).is_file():
            raise FileNotFoundError(f"pipeline folder {p} has no {sub}/ subfolder (expected {p / sub})")
        else:
            raise FileNotFoundError(f"{p} has no {CONFIG_NAME} (expected {p / CONFIG_NAME}) and no {sub}/ "
                                    f"subfolder; expected {_layout(kind, sub)}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"model folder {folder} has no {CONFIG_NAME} (expected {folder / CONFIG_NAME})")
    names = _weight_names(variant)
    if not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(f"model folder {folder} has no weights: expected {folder / names[0]} "
                                f"(or one of {', '.join(names[1:])})")
    return folder, None


def _config_for_file(file: Path, config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if config is not None:
        c = Path(config).expanduser()
        if c.is_dir():
            c = c / CONFIG_NAME
        if not c.is_file():
            raise FileNotFoundError(f"config for {file} not found: expected {c}")
        return _read_json(c)
    candidates = [file.with_suffix(".json"), file.parent / CONFIG_NAME]
    for c in candidates:
        if c.is_file():
            return _read_json(c)
    raise FileNotFoundError(f"single-file model {file} needs its diffusers config: expected "
                            f"{' or '.join(str(c) for c in candidates)} (or pass config=)")


def _check_class(config: Mapping[str, Any], kind: str, where: Path) -> None:
    name = config.get("_class_name")
    if name is not None and name not in CLASS_NAMES[kind]:
        raise ValueError(f"{where} holds a {name}, not a {' / '.join(CLASS_NAMES[kind])} (kind {kind!r})")


def _model_class(kind: str) -> Any:
    d = _diffusers()
    return {"unet": d.UNet2DConditionModel, "pixart": d.PixArtTransformer2DModel,
            "sd3": d.SD3Transformer2DModel}[kind]


def _pretrained_kwargs(dtype: torch.dtype | None, variant: str | None) -> dict[str, Any]:
    """from_pretrained options: local files only; without accelerate diffusers would warn and fall back to
    low_cpu_mem_usage=False anyway."""
    kwargs: dict[str, Any] = {"local_files_only": True,
                              "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if variant:
        kwargs["variant"] = variant
    return kwargs


def load_model(path: PathLike, kind: str, *, config: Any = None, dtype: torch.dtype | None = None,
               variant: str | None = None) -> nn.Module:
    """A diffusers model of `kind` ("unet" | "pixart" | "sd3") from local files only, in eval mode."""
    cls = _model_class(kind)
    folder, file = resolve_model_path(path, kind, variant)
    if file is None:
        _check_class(_read_json(folder / CONFIG_NAME), kind, folder / CONFIG_NAME)
        model = cls.from_pretrained(str(folder), **_pretrained_kwargs(dtype, variant))
    else:
        from safetensors.torch import load_file

        cfg = _config_for_file(file, config)
        _check_class(cfg, kind, file)
        state = load_file(str(file))
        if any(k.startswith("model.diffusion_model.") for k in state):
            raise ValueError(f"{file} is in the original (LDM/SAI) layout, not diffusers layout; convert it to a "
                             "diffusers folder first (e.g. with diffusers' conversion scripts on a machine that "
                             "has the model's configs)")
        model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{file} does not match its config: {len(missing)} missing key(s) "
                             f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
        if dtype is not None:
            nn.Module.to(model, dtype)
    return model.eval()


def load_unet(path: PathLike, **kwargs: Any) -> nn.Module:
    """UNet2DConditionModel from a local unet folder, pipeline folder or .safetensors file (+ config)."""
    return load_model(path, "unet", **kwargs)


def load_pixart_transformer(path: PathLike, **kwargs: Any) -> nn.Module:
    """PixArt-alpha transformer (PixArtTransformer2DModel; legacy Transformer2DModel configs are remapped)."""
    return load_model(path, "pixart", **kwargs)


def load_sd3_transformer(path: PathLike, **kwargs: Any) -> nn.Module:
    """SD3Transformer2DModel from local files."""
    return load_model(path, "sd3", **kwargs)


def find_scheduler_config(path: PathLike) -> Path | None:
    """scheduler_config.json for a model path: the file itself, <folder>/, <folder>/scheduler/, <parent>/scheduler/."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name == SCHEDULER_CONFIG_NAME:
            return p
        p = p.parent
    for c in (p / SCHEDULER_CONFIG_NAME, p / "scheduler" / SCHEDULER_CONFIG_NAME,
              p.parent / "scheduler" / SCHEDULER_CONFIG_NAME):
        if c.is_file():
            return c
    return None


def load_scheduler_config(path: PathLike) -> dict[str, Any]:
    """A scheduler config (dict) from scheduler_config.json, a scheduler/ folder or a pipeline folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return _read_json(p)
    if not p.exists():
        raise FileNotFoundError(f"scheduler config {p} does not exist (expected a {SCHEDULER_CONFIG_NAME} file, "
                                f"a scheduler folder, or a pipeline folder)")
    for c in (p / SCHEDULER_CONFIG_NAME, p / "scheduler" / SCHEDULER_CONFIG_NAME):
        if c.is_file():
            return _read_json(c)
    raise FileNotFoundError(f"{p} has no {SCHEDULER_CONFIG_NAME} (expected {p / SCHEDULER_CONFIG_NAME} or "
                            f"{p / 'scheduler' / SCHEDULER_CONFIG_NAME})")


def detect_kind(path: PathLike, config: Any = None) -> str:
    """"unet", "pixart" or "sd3" from the model's config.json _class_name (or the pipeline's layout)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected a local diffusers model or pipeline folder")
    if p.is_file():
        cfg = _config_for_file(p, config)
    else:
        candidates = [p / CONFIG_NAME, p / "unet" / CONFIG_NAME, p / "transformer" / CONFIG_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"cannot tell the model kind of {p}: expected one of "
                                    f"{', '.join(str(c) for c in candidates)}")
        cfg = _read_json(found)
    name = cfg.get("_class_name")
    for kind, names in CLASS_NAMES.items():
        if name in names:
            return kind
    raise ValueError(f"{p}: model class {name!r} is not supported; supported: "
                     f"{', '.join(n for names in CLASS_NAMES.values() for n in names)}")


def load_denoiser(path: PathLike, kind: str = "auto", *, config: Any = None, scheduler: Any = None,
                  dtype: torch.dtype | None = None, variant: str | None = None) -> nn.Module:
    """A Denoiser from a local diffusers pipeline/model folder or file; the scheduler config is found beside it.

    scheduler: None looks for scheduler_config.json next to the model (defaults apply when there is
    none: SD1.5's scaled_linear eps for a UNet); a path must exist.
    """
    resolved = detect_kind(path, config) if kind == "auto" else kind
    if resolved not in KINDS:
        raise ValueError(f"kind must be auto or one of {', '.join(KINDS)}, got {kind!r}")
    model = load_model(path, resolved, config=config, dtype=dtype, variant=variant)
    if scheduler is None:
        found = find_scheduler_config(path)
        scheduler = load_scheduler_config(found) if found is not None else None
    return DENOISERS[resolved](model, scheduler)


# ============================================================================================== random tiny/test models
def build_model(kind: str, config: Mapping[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A diffusers model of `kind` with random weights from a config dict (no file, no download).

    Built directly in `dtype` (no float32 copy on the way), so peak memory is that of the model.
    """
    cls = _model_class(kind)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        model = cls.from_config(dict(config))
    finally:
        torch.set_default_dtype(previous)
    nn.Module.to(model, dtype)  # buffers made outside the default dtype (diffusers' .to() only adds a warning)
    return model.eval()


# ============================================================================================== VAE (image rewards)
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
TAESD_PREFIX = "taesd:"


def _vae_layout() -> str:
    return (f"a diffusers AutoencoderKL / AutoencoderTiny folder ({CONFIG_NAME} + {WEIGHT_NAMES[0]}), a pipeline "
            f"folder with a vae/ subfolder, or a .safetensors file in diffusers layout with its {CONFIG_NAME}")


def split_vae_spec(spec: str) -> tuple[str, bool]:
    """'taesd:PATH' -> (PATH, True), a TAESD (AutoencoderTiny) folder; 'PATH' -> (PATH, False), class from config."""
    if spec.lower().startswith(TAESD_PREFIX):
        return spec[len(TAESD_PREFIX):], True
    return spec, False


def find_vae(model_path: PathLike) -> Path | None:
    """The VAE folder beside a model: <model>/vae/, or <pipeline>/vae/ when the model is its unet/ or transformer/."""
    p = Path(model_path).expanduser()
    folder = p.parent if p.is_file() else p
    candidates = [folder / "vae"]
    if folder.name in set(SUBFOLDERS.values()) or p.is_file():
        candidates.append(folder.parent / "vae")
    return next((c for c in candidates if (c / CONFIG_NAME).is_file()), None)


def resolve_vae_path(path: PathLike, variant: str | None = None) -> tuple[Path, Path | None]:
    """(VAE folder, None) or (its single .safetensors file, that file); FileNotFoundError names what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"VAE {p} does not exist; expected {_vae_layout()}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: a single-file VAE must be a .safetensors file in diffusers layout")
        return p, p
    folder = p
    if not (folder / CONFIG_NAME).is_file():
        if not (p / "vae" / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"VAE folder {p} has no {CONFIG_NAME} (expected {p / CONFIG_NAME}, or "
                                    f"{p / 'vae' / CONFIG_NAME} in a pipeline folder); expected {_vae_layout()}")
        folder = p / "vae"
    names = _weight_names(variant)
    if not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(f"VAE folder {folder} has no weights: expected {folder / names[0]} "
                                f"(or one of {', '.join(names[1:])})")
    return folder, None


def _vae_class(config: Mapping[str, Any], tiny: bool, where: Path) -> Any:
    name = config.get("_class_name") or ("AutoencoderTiny" if tiny else "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"{where} holds a {name}, not a VAE ({' / '.join(VAE_CLASSES)})")
    if tiny and name != "AutoencoderTiny":
        raise ValueError(f"{where} holds a {name}; the {TAESD_PREFIX} prefix is for an AutoencoderTiny (TAESD) folder")
    return getattr(_diffusers(), name)


def load_vae(path: PathLike, *, tiny: bool = False, dtype: torch.dtype | None = None,
             variant: str | None = None) -> nn.Module:
    """A diffusers AutoencoderKL (or AutoencoderTiny: TAESD) from local files only, frozen, in eval mode.

    tiny=True requires an AutoencoderTiny; otherwise the class comes from the config's _class_name
    (AutoencoderKL when absent, as in single-file configs).
    """
    folder, file = resolve_vae_path(path, variant)
    if file is None:
        cls = _vae_class(_read_json(folder / CONFIG_NAME), tiny, folder / CONFIG_NAME)
        vae = cls.from_pretrained(str(folder), **_pretrained_kwargs(dtype, variant))
    else:
        from safetensors.torch import load_file

        cfg = _config_for_file(file, None)
        cls = _vae_class(cfg, tiny, file)
        state = load_file(str(file))
        if any(k.startswith(("first_stage_model.", "decoder.up.")) for k in state):
            raise ValueError(f"{file} is a VAE in the original (LDM/SAI) layout, not diffusers layout; use the "
                             "model's diffusers vae/ folder (config.json + diffusion_pytorch_model.safetensors)")
        vae = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{file} does not match its config: {len(missing)} missing key(s) {missing[:3]}, "
                             f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
        if dtype is not None:
            nn.Module.to(vae, dtype)
    return vae.requires_grad_(False).eval()


class VAEDecoder(nn.Module):
    """The frozen, differentiable decode of latents to images in [0, 1] (rewards.LatentToImageReward's `decode`).

    decode(z) = (vae.decode(z / scaling_factor + shift_factor).sample + 1) / 2, the pipelines' own formula
    (shift_factor: SD3's VAE; 0 otherwise; TAESD has scaling_factor 1, as its latents are the denoiser's).
    Not clamped, so the reward gradient is never cut (rewards.PixelReward does the same); `images` clamps.
    The VAE's weights never take gradients; gradients flow to z only. Latents run in the VAE's dtype,
    images come back in float32 on z's device.
    """

    def __init__(self, vae: nn.Module, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(getattr(config, "latent_channels", 4))
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()  # non-reentrant torch.utils.checkpoint: fine with frozen weights

    @property
    def scale(self) -> int:
        """Pixels per latent element: 2 ** (number of upsampling stages)."""
        config = self.vae.config
        if hasattr(config, "upsampling_scaling_factor"):  # AutoencoderTiny
            return int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
        return 2 ** (len(config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> VAEDecoder:
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode, whatever the reward around it is set to
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the VAE decodes latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        dtype, device = _model_dtype(self.vae), _model_device(self.vae)
        latents = z.to(device=device, dtype=torch.float32) / self.scaling_factor + self.shift_factor
        x = self.vae.decode(latents.to(dtype), return_dict=False)[0]
        return ((x.float() + 1.0) / 2.0).to(z.device)

    @torch.no_grad()
    def images(self, z: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (clamped, as the pipelines do), without gradients."""
        return self.forward(z).clamp(0.0, 1.0)


# ============================================================================================== prompt embeddings
def save_prompt_embeddings(path: PathLike, conditioning: Mapping[str, Any]) -> None:
    """Write {prompt: cond dict (batch 1)} to a .safetensors file that the "diffusers" problem reads.

    Tensors are stacked per key over prompts; the prompt list goes to the metadata. Include the null
    prompt "" (its conditioning is the unconditional one for CFG).
    """
    from safetensors.torch import save_file

    prompts = list(conditioning)
    if not prompts:
        raise ValueError("no prompts to save")
    flat = [_flatten(_cond_dict(conditioning[p])) for p in prompts]
    keys = sorted(flat[0])
    for p, f in zip(prompts, flat, strict=True):
        if sorted(f) != keys:
            raise ValueError(f"prompt {p!r} has conditioning keys {sorted(f)}, the first prompt {keys}")
    tensors = {k: torch.cat([f[k].detach().cpu() for f in flat], dim=0).contiguous() for k in keys}
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts)})


def _flatten(cond: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in cond.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != 1:
                raise ValueError(f"conditioning {prefix}{k} must have batch 1, got shape {tuple(v.shape)}")
            out[f"{prefix}{k}"] = v
        else:
            raise TypeError(f"conditioning {prefix}{k} must be a tensor, got {type(v).__name__}")
    return out


def load_prompt_embeddings(path: PathLike) -> dict[str, dict[str, Any]]:
    """{prompt: cond dict with batch 1} from a file written by save_prompt_embeddings."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt embeddings file {p} does not exist (write it with "
                                "diffinstruct.hosts.diffusers.save_prompt_embeddings)")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "prompts" not in meta:
        raise ValueError(f"{p} has no 'prompts' metadata; write it with save_prompt_embeddings")
    prompts = json.loads(meta["prompts"])
    out: dict[str, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        cond: dict[str, Any] = {}
        for key, t in tensors.items():
            if t.shape[0] != len(prompts):
                raise ValueError(f"{p}: tensor {key} has {t.shape[0]} rows for {len(prompts)} prompts")
            node = cond
            *heads, leaf = key.split(".")
            for h in heads:
                node = node.setdefault(h, {})
            node[leaf] = t[i : i + 1].clone()
        out[prompt] = cond
    return out


# ============================================================================================== the "diffusers" problem
def _register_problem() -> None:
    """Adds the "diffusers" problem to the CLI registry (`python -m diffinstruct train --config run.toml`)."""
    from ..cli import Built, Option, Problem, RewardKind, RunSpec, build_reward, register_problem, register_reward
    from ..config import ConfigError

    dtypes = ("float32", "bfloat16", "float16")
    targets: dict[str, Callable[[str, nn.Module], bool] | None] = {
        "attention_conv": attention_and_conv_target, "attention": attention_target, "all": None}

    class DiffusersProblem(Problem):
        """A local diffusers model (SD1.5/SDXL UNet, PixArt-alpha, SD3) with precomputed prompt embeddings.

        [diffusers] model = a local pipeline folder, unet/transformer folder, or .safetensors file (+ config);
        embeddings = a .safetensors file from save_prompt_embeddings holding every training prompt and
        the null prompt "" (the CFG unconditional). Latents are channels x latent_size x latent_size.

        Image rewards (`train --reward SPEC`, [reward] name = "image") and `evaluate --checkpoint` decode the
        latents with a frozen VAE (VAEDecoder): [diffusers] vae = an AutoencoderKL folder or .safetensors file
        (+ config.json), or "taesd:PATH" for a TAESD (AutoencoderTiny) folder; by default the vae/ folder beside
        the model (<pipeline>/vae/). It runs in the run's dtype (float32 for a float16 run when its config sets
        force_upcast), optionally with gradient checkpointing. There is no text encoder here: every prompt is
        conditioned by its entry in `embeddings`, so `evaluate --checkpoint --prompts` needs the prompt set's
        conditioning in that file too.
        """

        name = "diffusers"
        options = {
            "model": Option("str", help="local path: a diffusers pipeline folder, a unet/ or transformer/ folder, "
                                        "or a .safetensors file in diffusers layout with its config.json"),
            "embeddings": Option("str", help="prompt conditioning written by "
                                             "diffinstruct.hosts.diffusers.save_prompt_embeddings, with the null "
                                             "prompt \"\""),
            "kind": Option("str", "auto", choices=("auto", *KINDS)),
            "config": Option("str", "", help="config.json of a single-file model (default: found beside it)"),
            "scheduler": Option("str", "", help="scheduler_config.json or its folder (default: found beside the "
                                                "model)"),
            "mode": Option("str", "shared", choices=("shared", "full")),
            "lora_rank": Option("int", 16, low=1, high=4096),
            "lora_targets": Option("str", "attention_conv", choices=tuple(targets)),
            "dtype": Option("str", "float32", choices=dtypes),
            "gradient_checkpointing": Option("bool", False),
            "latent_size": Option("int", 64, low=1, high=1024, help="latent height and width (pixels / 8)"),
            "sigma_init": Option("float", None, low=0.0, open_low=True, help="generator sigma_init (default 2.5, "
                                                                             "or just under 1 for SD3)"),
            "vae": Option("str", "", help="VAE for image rewards and `evaluate`: a diffusers AutoencoderKL folder or "
                                          ".safetensors file (+ config.json), or taesd:PATH for a TAESD "
                                          "(AutoencoderTiny) folder; default: the vae/ folder beside the model"),
            "vae_gradient_checkpointing": Option("bool", False, help="recompute the VAE decoder's blocks in the "
                                                                     "reward's backward pass (less memory)"),
        }
        rewards = ("none", "latent_target")

        def check(self, spec: RunSpec) -> None:
            if importlib.util.find_spec("diffusers") is None:
                raise ConfigError("[run] problem = \"diffusers\" needs the diffusers package (pip install diffusers)")
            opts = spec.problem_options
            for key in ("model", "embeddings"):
                if not Path(opts[key]).expanduser().exists():
                    raise ConfigError(f"[diffusers] {key} = {opts[key]!r}: {Path(opts[key]).expanduser()} does not "
                                      "exist (only local files are used; nothing is downloaded)")
            for key in ("config", "scheduler"):
                if opts[key] and not Path(opts[key]).expanduser().exists():
                    raise ConfigError(f"[diffusers] {key} = {opts[key]!r} does not exist")
            a, b = opts["sigma_init"], spec.train.sigma_init
            if a is not None and b is not None and a != b:
                raise ConfigError(f"sigma_init is set in both [diffusers] ({a:g}) and [train] ({b:g}); set it in "
                                  "one place")
            if opts["vae"]:
                self._vae_location(spec)  # a VAE that is named must exist, even when nothing uses it yet
            if spec.reward["name"] == "image":
                self._need_vae(spec, "an image reward (--reward / [reward] name = \"image\")")

        def _vae_location(self, spec: RunSpec) -> tuple[Path, bool] | None:
            """(VAE path, is TAESD) from [diffusers] vae, or the vae/ folder beside the model; None when neither."""
            opts = spec.problem_options
            if opts["vae"]:
                raw, tiny = split_vae_spec(opts["vae"])
                if not raw.strip():
                    raise ConfigError(f"[diffusers] vae = {opts['vae']!r} names no path")
                path = Path(raw).expanduser()
            else:
                found = find_vae(opts["model"])
                if found is None:
                    return None
                path, tiny = found, False
            try:
                _, file = resolve_vae_path(path)
                if file is not None:
                    _config_for_file(file, None)  # a single file's config.json must be there too
            except (FileNotFoundError, ValueError) as exc:
                where = f"[diffusers] vae = {opts['vae']!r}" if opts["vae"] else f"the VAE beside the model ({path})"
                raise ConfigError(f"{where}: {exc}") from None
            return path, tiny

        def _need_vae(self, spec: RunSpec, why: str) -> tuple[Path, bool]:
            location = self._vae_location(spec)
            if location is None:
                model = Path(spec.problem_options["model"]).expanduser()
                raise ConfigError(f"{why} scores decoded images, so it needs the model's VAE: set [diffusers] vae = "
                                  f"\"/path/to/vae\" (a diffusers AutoencoderKL folder with {CONFIG_NAME} + "
                                  f"{WEIGHT_NAMES[0]}, or taesd:/path for a TAESD folder), or put that folder at "
                                  f"{(model.parent if model.is_file() else model) / 'vae'} (none was found there)")
            return location

        def _decoder(self, spec: RunSpec, why: str) -> VAEDecoder:
            """The frozen VAE decode of this run: its dtype, on the model's latents (channel count checked)."""
            path, tiny = self._need_vae(spec, why)
            opts = spec.problem_options
            try:
                vae = load_vae(path, tiny=tiny)  # float32 as stored; cast below, once
            except (FileNotFoundError, ValueError) as exc:
                raise ConfigError(f"[diffusers] vae {path}: {exc}") from None
            dtype = getattr(torch, opts["dtype"])
            if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
                dtype = torch.float32  # this VAE overflows in float16 (SDXL's): its config says to upcast
            nn.Module.to(vae, dtype)
            decoder = VAEDecoder(vae, gradient_checkpointing=opts["vae_gradient_checkpointing"])
            channels = self._channels(spec)
            if channels is not None and channels != decoder.latent_channels:
                raise ConfigError(f"[diffusers] vae {path} decodes {decoder.latent_channels}-channel latents, but the "
                                  f"model's latents have {channels} channels; use the VAE of this model family")
            return decoder

        def image_reward(self, scorer: Any, spec: RunSpec) -> Any:
            """rewards.LatentToImageReward: the scorer on the VAE-decoded generator latents (prompts go to it)."""
            from ..rewards import LatentToImageReward

            decoder = self._decoder(spec, "an image reward (--reward / [reward] name = \"image\")")
            if isinstance(scorer, nn.Module):
                scorer.requires_grad_(False).eval()
            return LatentToImageReward(decoder, scorer, str(getattr(scorer, "name", "") or spec.reward["spec"]))

        def generate_images(self, built: Built, spec: RunSpec, prompts: Sequence[str], seed: int) -> Any:
            """One image per prompt, [N, 3, H, W] in [0, 1]: the generator on each prompt's conditioning from
            [diffusers] embeddings (this problem has no text encoder), then the VAE decode. Sample i's noise is
            drawn from seed + i, so a prompt's image does not depend on the batching."""
            decoder = built.extras.get("vae_decoder")
            if decoder is None:
                decoder = built.extras["vae_decoder"] = self._decoder(spec, "`evaluate --checkpoint`")
            table = built.extras["embeddings"]
            missing = [p for p in prompts if p not in table]
            if missing:
                raise ConfigError(f"{len(missing)} of {len(prompts)} prompts (e.g. {missing[0]!r}) have no "
                                  f"conditioning in [diffusers] embeddings = {spec.problem_options['embeddings']!r}: "
                                  "this problem has no text encoder and conditions on those precomputed embeddings; "
                                  "add the evaluation prompts to that file (save_prompt_embeddings), or evaluate on "
                                  "a prompt file (--prompts FILE) holding its prompts")
            models = built.models
            z = torch.stack([_normal(models.latent_shape, seed + i) for i in range(len(prompts))])
            for module in models.modules:
                module.eval()
            with torch.no_grad():
                x0 = models.generator(z, _stack([table[p] for p in prompts])).float()
            return decoder.images(x0).cpu()

        def _channels(self, spec: RunSpec) -> int | None:
            opts = spec.problem_options
            try:
                kind = detect_kind(opts["model"], opts["config"] or None) if opts["kind"] == "auto" else opts["kind"]
                p = Path(opts["model"]).expanduser()
                if p.is_file():
                    cfg = _config_for_file(p, opts["config"] or None)
                else:
                    folder, _ = resolve_model_path(p, kind)
                    cfg = _read_json(folder / CONFIG_NAME)
                return int(cfg.get("in_channels", 4))
            except (OSError, ValueError):
                return None

        def data_numel(self, spec: RunSpec) -> int | None:
            channels = self._channels(spec)
            return None if channels is None else channels * spec.problem_options["latent_size"] ** 2

        def build(self, spec: RunSpec) -> Built:
            from ..assembly import build_models
            from ..prompts import PromptList

            opts = spec.problem_options
            denoiser = load_denoiser(opts["model"], opts["kind"], config=opts["config"] or None,
                                     scheduler=opts["scheduler"] or None, dtype=getattr(torch, opts["dtype"]))
            if opts["gradient_checkpointing"] and not set_gradient_checkpointing(denoiser, True):
                raise ConfigError("[diffusers] gradient_checkpointing = true, but this model does not support it")
            channels = int(host_model(denoiser).config.in_channels)
            shape = (channels, opts["latent_size"], opts["latent_size"])
            sigma_init = opts["sigma_init"] if opts["sigma_init"] is not None else spec.train.sigma_init
            target = targets[opts["lora_targets"]]
            kwargs = {"target": target} if target is not None else {}
            with torch.random.fork_rng(devices=[]):  # LoRA's random init from [run] seed: runs are reproducible
                torch.manual_seed(spec.seed)
                models = build_models(denoiser, shape, mode=opts["mode"], rank=opts["lora_rank"],
                                      sigma_init=sigma_init, **kwargs)
            table = load_prompt_embeddings(opts["embeddings"])
            if "" not in table:
                raise ConfigError(f"[diffusers] embeddings {opts['embeddings']} has no null prompt \"\" (needed as the "
                                  "unconditional conditioning)")
            prompts = PromptList([p for p in table if p.strip()], encode=table.__getitem__, null="")
            reward = build_reward(spec)
            decoder = getattr(reward, "decode", None)
            return Built(models=models, prompts=prompts, reward=reward,
                         extras={"denoiser": denoiser, "latent_shape": shape, "embeddings": table,
                                 "vae_decoder": decoder if isinstance(decoder, VAEDecoder) else None})

        def _generate(self, built: Built, spec: RunSpec, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
            models = built.models
            prompts = built.prompts.prompts
            chosen = [prompts[i % len(prompts)] for i in range(n)]
            z = torch.empty((n, *models.latent_shape), dtype=torch.float32)
            kernels.fill_normal(z, seed)
            out = []
            for module in models.modules:
                module.eval()
            with torch.no_grad():
                for start in range(0, n, spec.train.batch_size):
                    part = chosen[start : start + spec.train.batch_size]
                    cond = _stack([built.prompts.conditioning(p) for p in part])
                    out.append(models.generator(z[start : start + len(part)], cond).float())
            return torch.cat(out), chosen

        def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
            x, chosen = self._generate(built, spec, n, seed)
            result: dict[str, Any] = {"n": n, "latent_mean": float(x.mean()), "latent_std": float(x.std()),
                                      "finite_fraction": float(torch.isfinite(x).float().mean())}
            if built.reward is not None:
                with torch.no_grad():
                    cond = _stack([built.prompts.conditioning(p) for p in chosen])
                    result["reward_mean"] = float(built.reward(x, chosen, cond).float().mean())
            return result

        def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
                   plot_path: Path | None) -> dict[str, Any]:
            x, chosen = self._generate(built, spec, n, seed)
            points_path.parent.mkdir(parents=True, exist_ok=True)
            if points_path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({"latents": x.contiguous()}, str(points_path),
                          metadata={"problem": self.name, "prompts": json.dumps(chosen), "seed": str(seed)})
            else:
                np.save(points_path, x.numpy())
            result: dict[str, Any] = {"samples": str(points_path), "n": n, "seed": seed}
            if plot_path is None:
                result["note"] = "latents; no preview image was asked for"
                return result
            if self._vae_location(spec) is None:
                result["note"] = ("latents; no decoded preview (set [diffusers] vae, or put the model's vae/ folder "
                                  "beside it, for a PNG grid of the decoded images)")
                return result
            from ..evaluate import save_png_atomic

            decoder = built.extras.get("vae_decoder")
            if decoder is None:
                decoder = built.extras["vae_decoder"] = self._decoder(spec, "`sample`'s decoded preview")
            shown = decoder.images(x[:16])
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            save_png_atomic(_grid(shown, columns=4), plot_path)
            result["plot"] = str(plot_path)
            result["note"] = (f"latents; {plot_path.name} shows the first {len(shown)} decoded with the VAE, "
                              "4 per row")
            return result

    problem = DiffusersProblem()
    register_problem(problem)

    def latent_target(options: dict[str, Any], spec: RunSpec) -> Any:
        from ..rewards import TargetReward

        channels = problem._channels(spec)
        if channels is None:
            raise ConfigError(f"[reward] latent_target: cannot read the channel count of "
                              f"{spec.problem_options['model']}")
        size = spec.problem_options["latent_size"]
        return TargetReward(torch.full((channels, size, size), float(options["value"])))

    register_reward(RewardKind("latent_target", {"value": Option("float", 0.0, help="every latent element's target")},
                               latent_target))


def _normal(shape: Sequence[int], seed: int) -> torch.Tensor:
    z = torch.empty(tuple(shape), dtype=torch.float32)
    kernels.fill_normal(z, seed)
    return z


def _grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, 3, H, W] -> one image [3, rows * H, columns * W], row-major, empty cells black."""
    n, c, h, w = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    canvas = images.new_zeros((rows * cols, c, h, w))
    canvas[:n] = images
    return canvas.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def _stack(conds: Sequence[Any]) -> Any:
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    return {k: _stack([c[k] for c in conds]) for k in first}


_register_problem()
