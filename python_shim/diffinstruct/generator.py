"""The one-step generator g(z, c) = D_theta(sigma_init z, sigma_init, c), and role views of a shared base."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .denoisers import Denoiser
from .lora import RoleSwitch


def default_sigma_init(denoiser: Denoiser) -> float:
    """2.5 for VE/VP models (docs/ALGORITHM.md section 10, decision 5); just under 1 for flow models."""
    return min(2.5, denoiser.sigma_max)


class OneStepGenerator(nn.Module):
    """x0 = D(sigma_init z, sigma_init, c): the denoiser's weights are the generator's."""

    def __init__(self, denoiser: Denoiser, sigma_init: float | None = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init if sigma_init is not None else default_sigma_init(denoiser))
        if not self.sigma_init > 0:
            raise ValueError(f"sigma_init must be > 0, got {self.sigma_init}")

    def forward(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=torch.float32, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, cond)


class RoleView(nn.Module):
    """One role of a LoRA-adapted shared base, usable wherever a denoiser is expected."""

    def __init__(self, base: nn.Module, switch: RoleSwitch, role: str | None) -> None:
        super().__init__()
        self.base = base
        self.switch = switch
        self.role = role
        self.process = base.process
        self.sigma_min = base.sigma_min
        self.sigma_max = base.sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        with self.switch.use(self.role):
            return self.base(x, sigma, cond)
