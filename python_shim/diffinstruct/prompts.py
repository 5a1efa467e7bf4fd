"""Prompt sources: sampled prompts with their conditioning (cached per prompt) and the null conditioning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import kernels


@dataclass
class PromptBatch:
    prompts: list[str]
    cond: Any
    uncond: Any


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items, dim=0)
    if isinstance(first, dict):
        return {k: _cat([it[k] for it in items]) for k in first}
    if isinstance(first, bool | int | float):  # a model input that is one value for the batch (num_tokens)
        if any(it != first for it in items):
            raise ValueError(f"a conditioning constant differs within one batch ({sorted(set(items))}): such "
                             f"conditionings cannot share a network pass")
        return first
    raise TypeError(f"conditioning must be a tensor or a dict of tensors, got {type(first).__name__}")


def join_conditioning(cond: Any, uncond: Any) -> Any | None:
    """cond and uncond stacked along the batch (cond first) for one network pass over both, or None when they do
    not stack (a tensor pair, or dicts with the same keys, whose shapes differ beyond the batch dimension)."""
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        if cond.shape[1:] != uncond.shape[1:] or cond.dtype != uncond.dtype or cond.device != uncond.device:
            return None
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict) and isinstance(uncond, dict) and cond.keys() == uncond.keys():
        joined = {}
        for key in cond:
            a, b = cond[key], uncond[key]
            if isinstance(a, torch.Tensor | dict) or isinstance(b, torch.Tensor | dict):
                joined[key] = join_conditioning(a, b)
            else:  # a constant of both batches (num_tokens): one pass only when they agree
                joined[key] = a if a == b else None
        return None if any(v is None for v in joined.values()) else joined
    return None


class PromptList:
    """Uniformly sampled prompts; `encode` maps one prompt to conditioning with batch size 1."""

    def __init__(self, prompts: Sequence[str], encode: Callable[[str], Any], null: str = "") -> None:
        cleaned = [p for p in prompts if isinstance(p, str) and p.strip()]
        if not cleaned:
            raise ValueError("the prompt list is empty: give at least one non-blank prompt")
        self.prompts = cleaned
        self.encode = encode
        self.null = null
        self._cache: dict[str, Any] = {}

    def conditioning(self, prompt: str) -> Any:
        if prompt not in self._cache:
            with torch.no_grad():
                self._cache[prompt] = self.encode(prompt)
        return self._cache[prompt]

    def batch(self, size: int, seed: int) -> PromptBatch:
        u = np.empty(size, np.float32)
        kernels.fill_uniform(u, seed)
        index = np.minimum((u * len(self.prompts)).astype(np.int64), len(self.prompts) - 1)
        chosen = [self.prompts[i] for i in index]
        cond = _cat([self.conditioning(p) for p in chosen])
        uncond = _cat([self.conditioning(self.null)] * size)
        return PromptBatch(chosen, cond, uncond)
