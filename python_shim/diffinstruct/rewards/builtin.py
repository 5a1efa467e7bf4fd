"""Built-in image scorers that need no weights (demos, tests). All are differentiable; images [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .preprocess import at_least_fp32, check_images

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.5, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.55, 0.27, 0.07),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
_WORD = re.compile(r"[a-z]+")


class BrightnessReward(nn.Module):
    """Mean luma (BT.601) per image, in [0, 1]."""

    name = "brightness"

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images)
        x = at_least_fp32(images)
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1).mean(dim=(1, 2))


class SaturationReward(nn.Module):
    """Mean over pixels of (max - min) over the RGB channels (HSV chroma), in [0, 1]."""

    name = "saturation"

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images)
        x = at_least_fp32(images)
        return (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))


def colour_in_prompt(prompt: str) -> tuple[float, float, float] | None:
    """The RGB of the first colour word in the prompt (see COLOURS), or None."""
    for word in _WORD.findall(prompt.lower()):
        if word in COLOURS:
            return COLOURS[word]
    return None


class ColorMatchReward(nn.Module):
    """-||mean RGB of the image - colour named in the prompt||^2, in [-3, 0]; 0 (constant) for prompts naming no colour.

    The colour is the first word of the prompt found in `COLOURS` ("a red car" -> (1, 0, 0)).
    """

    name = "color_match"

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        mean_rgb = at_least_fp32(images).mean(dim=(2, 3))  # [B, 3]
        targets = [colour_in_prompt(p) for p in prompts]
        has = torch.tensor([t is not None for t in targets], device=images.device)
        tgt = torch.tensor([t if t is not None else (0.0, 0.0, 0.0) for t in targets], device=images.device,
                           dtype=mean_rgb.dtype)
        r = -((mean_rgb - tgt) ** 2).sum(dim=1)
        return torch.where(has, r, r * 0.0)


BUILTIN = {"brightness": BrightnessReward, "saturation": SaturationReward, "color_match": ColorMatchReward}
