"""The reward interface: r(x0 latents, prompts, cond) -> one differentiable score per sample.

Built-in rewards need no weights (tests, demos). Image rewards compose a
differentiable decoder with an image scorer through `LatentToImageReward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any) -> torch.Tensor: ...


@runtime_checkable
class NoisyReward(Protocol):
    """A reward living on the noisy sample x_t at each level (e.g. CFG's implicit reward).

    `grad_xt` returns grad_{x_t} r per sample in score units; the engine weighs it like the
    IKL term (w(t) = sigma^2), i.e. feeds sigma^2 * grad_xt to the generator-gradient kernel.
    """

    name: str
    noisy: bool

    def grad_xt(self, xt: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any) -> torch.Tensor: ...


class ImplicitCFGReward:
    """r = log p_ref(c | x_t): grad = s_ref(x_t | c) - s_ref(x_t) = (D_cond - D_uncond) / sigma^2 (Theorem 3.4).

    DI++ with this reward at scale alpha = omega - 1 equals DI with an omega-CFG teacher.
    """

    name = "implicit_cfg"
    noisy = True

    def __init__(self, reference: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> None:
        self.reference = reference

    @torch.no_grad()
    def grad_xt(self, xt: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any) -> torch.Tensor:
        s2 = (sigma.float() ** 2).reshape((-1,) + (1,) * (xt.dim() - 1))
        return (self.reference(xt, sigma, cond).float() - self.reference(xt, sigma, uncond).float()) / s2


class TargetReward(nn.Module):
    """r(x) = -||x - a||^2 per sample: pulls samples toward a (ground-truth tests)."""

    name = "target"

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().clone())

    def forward(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any) -> torch.Tensor:
        diff = x0.float() - self.target.to(x0.device)
        return -(diff * diff).reshape(x0.shape[0], -1).sum(dim=1)


class LatentToImageReward(nn.Module):
    """Decodes latents with a differentiable decoder, then scores images [B, 3, H, W] in [0, 1]."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], score: nn.Module, name: str) -> None:
        super().__init__()
        self.decode = decode
        self.score = score
        self.name = name

    def forward(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any) -> torch.Tensor:
        return self.score(self.decode(x0), prompts)


class WeightedRewards(nn.Module):
    """sum_k w_k r_k: several rewards combined with weights."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("need one weight per reward, and at least one reward")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights, strict=True))

    def forward(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any) -> torch.Tensor:
        total = torch.zeros(x0.shape[0], device=x0.device)
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            total = total + weight * reward(x0, prompts, cond)
        return total
