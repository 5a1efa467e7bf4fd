"""Frozen weights stored below the compute dtype under bf16 training.

Under bf16 autocast every Linear / Conv2d casts its float32 weight to bf16 on every pass (autocast caches only the
casts of weights that require grad). A frozen layer can keep the bf16 weight itself: the cast rounds the same way,
so the run is bit-identical, and the weight takes half the memory. Outside autocast such a layer runs in its stored
dtype and returns the input's dtype, so sampling and evaluation in float32 keep working.

Stored parameters are marked, so that code inferring a network's compute dtype from its parameters (the diffusers
adapters cast their inputs to it) skips them: the network still computes in float32 (or bf16 under autocast).
lora.store_frozen_in stores LoRA's frozen bases and calls `store_frozen_layers_in` for the plain frozen layers
(full mode's reference, a shared base's layers that carry no adapter).
"""

from __future__ import annotations

import types

import torch
from torch import nn

_MARK = "_dipp_stored_frozen"  # set on a Parameter whose frozen layer stores it below the compute dtype


def mark_stored(module: nn.Module) -> None:
    """Mark the parameters of a frozen layer just stored below the compute dtype."""
    for p in module.parameters(recurse=False):
        setattr(p, _MARK, True)


def is_stored(p: torch.Tensor) -> bool:
    return bool(getattr(p, _MARK, False))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a network computes in: its first floating parameter's, skipping stored frozen weights (a network
    whose every floating parameter is stored computes in that dtype; one without any, in float32)."""
    first: torch.dtype | None = None
    for p in model.parameters():
        if p.is_floating_point():
            if not is_stored(p):
                return p.dtype
            first = first or p.dtype
    return first or torch.float32


def runs_stored(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a layer stored in `dtype` must cast `x` itself (outside autocast, another dtype)."""
    return x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)


def _stored_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward
    dtype = self.weight.dtype
    return forward(self, x.to(dtype)).to(x.dtype) if runs_stored(x, dtype) else forward(self, x)


def _plain_frozen(m: nn.Module, skip: set[int]) -> bool:
    weight = getattr(m, "weight", None)
    return (isinstance(m, nn.Linear | nn.Conv2d) and id(m) not in skip and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and not weight.requires_grad
            and all(not p.requires_grad for p in m.parameters(recurse=False))
            # a layer that casts its weights itself (ComfyUI's manual cast) or already has its own forward
            # (FrozenCast, a host's patch) is left as it is
            and not getattr(m, "comfy_cast_weights", False) and "forward" not in m.__dict__)


def store_frozen_layers_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen float32 Linear / Conv2d layers of `model` that are not a LoRA layer's base in `dtype`; returns
    how many were converted. Trainable layers, and layers whose weight is not float32, are left alone."""
    # a LoRA layer (it has frozen_dtype) has its base stored by lora.store_frozen_in
    skip = {id(m.base) for m in model.modules() if hasattr(m, "frozen_dtype")}
    layers = [m for m in model.modules() if _plain_frozen(m, skip)]
    for m in layers:
        m.to(dtype)
        m.forward = types.MethodType(_stored_forward, m)
        mark_stored(m)
    return len(layers)
