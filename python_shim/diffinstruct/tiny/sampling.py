"""The teacher's many-step sampler (EDM's deterministic Heun, Karras et al. 2022, Algorithm 1) with CFG."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int
from ..denoisers import Denoiser
from . import data


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """steps noise levels from sigma_max down to sigma_min, then 0 (steps + 1 values)."""
    check_int("steps", steps, 1, ValueError)
    i = torch.arange(steps, dtype=torch.float64)
    inv = 1.0 / rho
    denom = max(steps - 1, 1)
    s = (sigma_max**inv + i / denom * (sigma_min**inv - sigma_max**inv)) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def guided(denoiser: Denoiser, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor,
           omega: float) -> torch.Tensor:
    """D_uncond + omega (D_cond - D_uncond), both halves in one batch; omega = 1 is plain conditional."""
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32)
    if omega == 1.0:
        return denoiser(x, s, cond)
    both = denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, uncond]))
    d_c, d_u = both.chunk(2)
    return d_u + omega * (d_c - d_u)


@torch.no_grad()
def heun_sample(denoiser: Denoiser, tokens: torch.Tensor, noise: torch.Tensor, steps: int = 18,
                omega: float = 1.0) -> torch.Tensor:
    """EDM Heun from sigma_max to 0: 2 * steps - 1 denoiser evaluations (x2 with CFG). noise: unit normal."""
    if noise.dim() != 4 or noise.shape[0] != tokens.shape[0]:
        raise ValueError(f"noise must be [B, C, H, W] with B = {tokens.shape[0]}, got {tuple(noise.shape)}")
    if not omega >= 0:
        raise ValueError(f"omega must be >= 0, got {omega}")
    sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)
    uncond = torch.zeros_like(tokens)
    x = noise.float() * float(sigmas[0])
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - guided(denoiser, x, s, tokens, uncond, omega)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - guided(denoiser, x_next, s_next, tokens, uncond, omega)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


def noise_for(n: int, seed: int) -> torch.Tensor:
    """Unit-normal starting noise [n, 3, 16, 16], a pure function of the seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, data.SIZE, data.SIZE, generator=g)


def sample_teacher(teacher: Denoiser, prompts: Sequence[str], seed: int = 0, steps: int = 18,
                   omega: float = 2.0) -> torch.Tensor:
    """Teacher samples in [-1, 1] for the prompts (one each), EDM Heun with CFG weight omega."""
    tokens = data.tokenize(list(prompts))
    return heun_sample(teacher, tokens, noise_for(len(prompts), seed), steps=steps, omega=omega)
