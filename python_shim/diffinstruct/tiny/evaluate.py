"""Measurements on sample sets of the tiny problem: prompt fidelity, diversity, distance to the teacher, taste.

Prompt fidelity = the percentage of attributes (colour, shape, size, position) the classifier reads as the
prompt asked, averaged over samples ("attribute accuracy"); the share of samples with all four right is
reported beside it ("prompt accuracy").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from . import data
from .models import AttributeClassifier


@torch.no_grad()
def fidelity(classifier: AttributeClassifier, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Attribute and prompt accuracy in percent, and per attribute; images in [0, 1]."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    target = data.labels([data.parse_prompt(p) for p in prompts])
    logits = classifier(images.float())
    right = torch.stack([logits[k].argmax(dim=1) == target[:, i] for i, k in enumerate(data.ATTRIBUTES)], dim=1)
    out = {"attribute_accuracy": 100.0 * float(right.float().mean()),
           "prompt_accuracy": 100.0 * float(right.all(dim=1).float().mean())}
    for i, k in enumerate(data.ATTRIBUTES):
        out[f"{k}_accuracy"] = 100.0 * float(right[:, i].float().mean())
    return out


def diversity(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean pairwise RMS pixel distance between samples of the same prompt (images in [0, 1])."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    dists = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        x = images[idx].reshape(len(idx), -1).double()
        d = torch.cdist(x, x) / x.shape[1] ** 0.5
        iu = torch.triu_indices(len(idx), len(idx), offset=1)
        dists.append(d[iu[0], iu[1]])
    if not dists:
        raise ValueError("diversity needs at least two samples of one prompt")
    return float(torch.cat(dists).mean())


@torch.no_grad()
def feature_mmd(classifier: AttributeClassifier, a: torch.Tensor, b: torch.Tensor) -> float:
    """Squared MMD (biased, RBF kernels at 0.5, 1, 2 x the median distance) between the classifier features of
    two image sets; the bandwidths come from the pooled set, so the number is comparable across generators."""
    fa, fb = classifier.features(a.float()).double(), classifier.features(b.float()).double()
    pooled = torch.cat([fa, fb])
    med = float(torch.cdist(pooled, pooled).median()) or 1.0

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * (s * med) ** 2)) for s in (0.5, 1.0, 2.0))

    return float(k(fa, fa).mean() + k(fb, fb).mean() - 2 * k(fa, fb).mean())


def mean_pixel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean RMS pixel distance between paired samples (same prompt and seed)."""
    return float(((a.double() - b.double()) ** 2).reshape(a.shape[0], -1).mean(dim=1).sqrt().mean())
