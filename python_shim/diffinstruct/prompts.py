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
    raise TypeError(f"conditioning must be a tensor or a dict of tensors, got {type(first).__name__}")


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
