"""Conditioning dicts for diffusers models: the keys each model takes, cast to the model's dtype and device, with a
batch of 1 broadcast to the batch of x."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...frozen import compute_dtype


def _cond_dict(cond: Any) -> dict[str, Any]:
    if isinstance(cond, torch.Tensor):
        return {"encoder_hidden_states": cond}
    if isinstance(cond, Mapping):
        return dict(cond)
    raise TypeError(f"conditioning must be a tensor (encoder_hidden_states) or a dict of tensors, "
                    f"got {type(cond).__name__}")


def _fit(t: Any, batch: int, dtype: torch.dtype, device: torch.device, name: str) -> Any:
    """Cast floating tensors to the model's dtype and device; broadcast a batch of 1 to `batch`."""
    if t is None:
        return None
    if isinstance(t, Mapping):
        return {k: _fit(v, batch, dtype, device, f"{name}.{k}") for k, v in t.items()}
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 0 or t.shape[0] not in (1, batch):
        raise ValueError(f"conditioning {name} has batch {tuple(t.shape)[:1] or '()'}; expected {batch} or 1")
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _take(parts: dict[str, Any], key: str, model: str) -> Any:
    if key not in parts or parts[key] is None:
        raise ValueError(f"{model} conditioning needs {key!r}; got keys {sorted(parts)}")
    return parts.pop(key)


def _no_extra(parts: dict[str, Any], model: str, allowed: Sequence[str]) -> None:
    if parts:
        raise ValueError(f"unknown conditioning key(s) {', '.join(sorted(parts))} for {model}; "
                         f"valid keys: {', '.join(allowed)}")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the network computes in (frozen weights stored in bf16 under bf16 training do not count)."""
    return compute_dtype(model)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _stack(conds: Sequence[Any]) -> Any:
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    return {k: _stack([c[k] for c in conds]) for k in first}
