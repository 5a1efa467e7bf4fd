"""Denoisers D(x, sigma, cond) -> estimate of x0, over three kinds of networks.

The engine only ever sees this interface; the forward process it implies is
`process`: "ve" (x_t = x0 + sigma eps: EDM, and VP models in EDM coordinates)
or "flow" (x_t = (1 - sigma) x0 + sigma eps: rectified flow, SD3/Flux).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

Process = Literal["ve", "flow"]


@runtime_checkable
class Denoiser(Protocol):
    process: Process
    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor: ...


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.expand(x.shape[0]) if s.dim() == 0 else s


class EDMDenoiser(nn.Module):
    """EDM preconditioning around F: D = c_skip x + c_out F(c_in x, c_noise, cond), c_noise = ln(sigma)/4."""

    process: Process = "ve"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        s = _sigma_vector(sigma, x)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s**2 + sd2)
        c_in = 1.0 / torch.sqrt(s**2 + sd2)
        f = self.net(_per_sample(c_in, x) * x, torch.log(s) / 4.0, cond)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * f.to(x.dtype)


class VPDenoiser(nn.Module):
    """A discrete VP (DDPM) network as an EDM denoiser.

    The network takes (x / sqrt(1 + sigma^2), timestep, cond) and predicts eps or v.
    Only the timestep is snapped to the table (nearest sigma); the coefficients use the
    continuous sigma (docs/ALGORITHM.md section 2).
    """

    process: Process = "ve"

    def __init__(self, net: nn.Module, sigmas: np.ndarray | torch.Tensor,
                 prediction: Literal["eps", "v"] = "eps") -> None:
        super().__init__()
        table = torch.as_tensor(np.asarray(sigmas, dtype=np.float32))
        if table.dim() != 1 or table.numel() < 2 or not bool(torch.all(table[1:] > table[:-1])):
            raise ValueError("sigmas must be a 1-D table ascending in timestep")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.net = net
        self.prediction = prediction
        self.register_buffer("sigmas", table, persistent=False)
        self.sigma_min = float(table[0])
        self.sigma_max = float(table[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.argmin((self.sigmas[None, :] - sigma[:, None]).abs(), dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        s = _sigma_vector(sigma, x)
        c_in = 1.0 / torch.sqrt(s**2 + 1.0)
        out = self.net(_per_sample(c_in, x) * x, self.timestep(s), cond).to(x.dtype)
        if self.prediction == "eps":
            return x - _per_sample(s, x) * out
        return _per_sample(1.0 / (s**2 + 1.0), x) * x - _per_sample(s * c_in, x) * out


class FlowDenoiser(nn.Module):
    """Rectified flow: the network predicts v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps; x0 = x_t - sigma v."""

    process: Process = "flow"

    def __init__(self, net: nn.Module, sigma_min: float = 1e-3, sigma_max: float = 1.0 - 1e-3) -> None:
        super().__init__()
        self.net = net
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        s = _sigma_vector(sigma, x)
        return x - _per_sample(s, x) * self.net(x, s, cond).to(x.dtype)
