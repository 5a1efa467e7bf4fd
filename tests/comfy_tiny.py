"""Tiny stand-ins for ComfyUI's MODEL / CLIP / VAE, built by the package (random weights, no files).

They let every node of the pack run, and be tested, without ComfyUI: a small conditional conv net as an
SD1.5-like discrete VP epsilon model (the SD1.5 sigma table), a hashed bag-of-words prompt encoder, and a
latent -> RGB decoder with the SD VAE's 8x upscale.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinstruct.denoisers import FlowDenoiser, VPDenoiser

TOKENS = 8
WIDTH = 16
_WORD = re.compile(r"[a-z0-9]+")


def sd15_sigmas(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """SD1.5's "scaled_linear" schedule as EDM sigmas, ascending in timestep."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas) / alphas).astype(np.float32)


class TinyUNet(nn.Module):
    """eps(x, t, cond): two convs modulated by the timestep and the mean prompt token (FiLM)."""

    def __init__(self, channels: int = 4, hidden: int = 32, cond_dim: int = WIDTH, time_scale: float = 1e-3) -> None:
        super().__init__()
        self.time_scale = time_scale
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.context = nn.Linear(cond_dim, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x))
        film = self.time((t.float() * self.time_scale)[:, None]) + self.context(cond.float().mean(dim=1))
        h = F.silu(self.conv_mid(h + film[:, :, None, None]))
        return self.conv_out(h)


def tiny_model(seed: int = 0, channels: int = 4, prediction: str = "eps") -> nn.Module:
    """An SD1.5-like denoiser with random weights: prediction "eps" or "v" (discrete VP), or "flow"."""
    torch.manual_seed(seed)
    if prediction == "flow":
        model: nn.Module = FlowDenoiser(TinyUNet(channels, time_scale=1.0))
    elif prediction in ("eps", "v"):
        model = VPDenoiser(TinyUNet(channels), sd15_sigmas(), prediction=prediction)
    else:
        raise ValueError(f"prediction must be 'eps', 'v' or 'flow', got {prediction!r}")
    model.latent_channels = channels
    return model.eval()


class TinyTextEncoder(nn.Module):
    """prompt -> [1, TOKENS, WIDTH]: each word's hashed embedding, padded with the empty-prompt token."""

    def __init__(self, seed: int = 0, vocab: int = 512) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(vocab + 1, WIDTH, generator=gen) / WIDTH**0.5)
        self.vocab = vocab

    def _index(self, word: str) -> int:
        return int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % self.vocab

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        ids = [self._index(w) for w in _WORD.findall(prompt.lower())][:TOKENS]
        ids += [self.vocab] * (TOKENS - len(ids))
        return self.table[torch.tensor(ids)][None].clone()


class TinyDecoder(nn.Module):
    """Raw latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [0, 1]: 1x1 conv, nearest 8x upscale, sigmoid."""

    downscale = 8

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.Conv2d(channels, 3, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(3, channels, 1, 1, generator=gen))
            self.proj.bias.zero_()
        self.latent_channels = channels

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.interpolate(self.proj(latents), scale_factor=self.downscale, mode="nearest"))
