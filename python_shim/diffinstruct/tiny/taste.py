"""Stage 2's synthetic "human": a hidden taste that labels image pairs, from which a preference model is learned.

The hidden taste prefers high contrast: darker backgrounds. It scores an image by 1 - the median luma of its
pixels (the shape covers at most an eighth of the image, so the median is the background's level). The data's
backgrounds range over grey levels 0.15-0.65, so a generator can please this taste without changing what the
prompt asked for. The taste itself is never shown to the training: a rater compares two images and prefers the
one it likes more with Bradley-Terry probability sigmoid((taste(a) - taste(b)) / temperature); the preference
model (rewards/preference.py) learns a differentiable reward from those choices alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rewards.builtin import LUMA
from ..rewards.preference import Pairs, PreferenceModel, train

TEMPERATURE = 0.04


def hidden_taste(images: torch.Tensor) -> torch.Tensor:
    """1 - median luma per image, images [B, 3, H, W] in [0, 1] (higher = darker background = preferred)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    luma = (images.float().clamp(0, 1) * w).sum(dim=1).flatten(1)
    return 1.0 - luma.median(dim=1).values


def rate_pairs(images: torch.Tensor, n_pairs: int, seed: int, temperature: float = TEMPERATURE) -> Pairs:
    """n_pairs random pairs of `images` (in [0, 1]) labelled by the simulated rater (1 = a preferred)."""
    if images.shape[0] < 2:
        raise ValueError("rating pairs needs at least two images")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    ia = torch.randint(0, n, (n_pairs,), generator=g)
    ib = (ia + torch.randint(1, n, (n_pairs,), generator=g)) % n  # never an image with itself
    taste = hidden_taste(images)
    p = torch.sigmoid((taste[ia] - taste[ib]) / temperature)
    label = (torch.rand(n_pairs, generator=g) < p).float()
    return Pairs(images[ia].clamp(0, 1), images[ib].clamp(0, 1), label, [""] * n_pairs)


def fit_reward(images: torch.Tensor, n_pairs: int, seed: int,
               epochs: int = 60) -> tuple[PreferenceModel, dict[str, Any]]:
    """Rates pairs of `images` and trains the Bradley-Terry preference model on them; returns it and its record,
    including how often it agrees with the hidden taste on fresh pairs (noise-free labels)."""
    pairs = rate_pairs(images, n_pairs, seed)
    model, record = train(pairs, hidden=32, epochs=epochs, lr=3e-3, batch_size=256, seed=seed)
    fresh = rate_pairs(images, 2000, seed + 1, temperature=1e-6)
    with torch.no_grad():
        agree = ((model(fresh.image_a) > model(fresh.image_b)) == (fresh.label > 0.5)).float().mean()
    record["agreement_with_taste"] = float(agree)
    return model, record
