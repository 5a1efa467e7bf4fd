"""The reward interface: r(x0 latents, prompts, cond) -> one differentiable score per sample.

Two levels:

* `Reward`: what the trainer calls, `r(x0, prompts, cond) -> [B]` on the generator's output.
* `ImageScorer`: an image-space model, `s(images, prompts) -> [B]` on images [B, 3, H, W] in [0, 1].
  `LatentToImageReward` (latent models: decoder + scorer) and `PixelReward` (pixel-space
  generators: range map + scorer) turn a scorer into a `Reward`.
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


_NO_COND: Any = object()


@runtime_checkable
class ImageScorer(Protocol):
    """s(images [B, 3, H, W] in [0, 1], prompts) -> [B], differentiable with respect to the images."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class PixelReward(nn.Module):
    """A `Reward` for pixel-space generators: maps x0 from `value_range` to [0, 1] (affine, no clamp, so the
    gradient is never cut), then scores the images."""

    def __init__(self, score: nn.Module, value_range: tuple[float, float] = (-1.0, 1.0),
                 name: str | None = None) -> None:
        super().__init__()
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.score = score
        self.lo, self.hi = lo, hi
        self.name = name or str(getattr(score, "name", "pixel"))

    def forward(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any = None) -> torch.Tensor:
        return self.score((x0.float() - self.lo) / (self.hi - self.lo), prompts)


class WeightedRewards(nn.Module):
    """sum_k w_k r_k: several rewards combined with weights.

    Works for `Reward`s (called with `(x0, prompts, cond)`) and for `ImageScorer`s (called with
    `(images, prompts)` when no `cond` is passed).
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("need one weight per reward, and at least one reward")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights, strict=True))

        for i, reward in enumerate(self.rewards):  # registered, so .to() / .state_dict() reach them
            if isinstance(reward, nn.Module):
                self.add_module(f"reward{i}", reward)

    def forward(self, x0: torch.Tensor, prompts: Sequence[str], cond: Any = _NO_COND) -> torch.Tensor:
        total = torch.zeros(x0.shape[0], device=x0.device)
        for reward, weight in zip(self.rewards, self.weights, strict=True):
            r = reward(x0, prompts) if cond is _NO_COND else reward(x0, prompts, cond)
            total = total + weight * (r if r.dtype == torch.float64 else r.float())
        return total
