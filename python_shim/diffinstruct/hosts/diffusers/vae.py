"""VAEs for image rewards: a local AutoencoderKL (or AutoencoderTiny, TAESD) and `VAEDecoder`, its frozen,
differentiable decode of latents to images in [0, 1]."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditioning import _model_device, _model_dtype
from .layout import (
    CONFIG_NAME,
    SUBFOLDERS,
    WEIGHT_NAMES,
    PathLike,
    _config_for_file,
    _diffusers,
    _pretrained_kwargs,
    _read_json,
    _weight_names,
)

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
