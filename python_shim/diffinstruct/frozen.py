"""Frozen weights stored below the compute dtype under bf16 training.

Under bf16 autocast every Linear / Conv2d casts its float32 weight to bf16 on every pass (autocast caches only the
casts of weights that require grad). A frozen layer can keep the bf16 weight itself: the cast rounds the same way,
so the run is bit-identical, and the weight takes half the memory. Outside autocast such a layer runs in its stored
dtype and returns the input's dtype (forward hooks, so the module still deep-copies and pickles), so sampling and
evaluation in float32 keep working.

A stored layer is marked (on the module: the mark survives deepcopy), so that code inferring a network's compute
dtype from its parameters (the diffusers adapters cast their inputs to it) skips its weights: the network still
computes in its original dtype (or bf16 under autocast). lora.store_frozen_in stores LoRA's frozen bases and calls
`store_frozen_layers_in` for the plain frozen layers (full mode's reference, a shared base's layers that carry no
adapter). Training takes the teacher over as shared mode's LoRA does: its frozen layers are converted in place.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

_MARK = "_dipp_stored_from"  # on a layer whose weights are stored below their original dtype: that dtype
_CAST_BACK = "_dipp_cast_back"  # the inputs' dtypes, pushed by a stored layer's pre-hook, popped by its hook


def mark_stored(module: nn.Module, original: torch.dtype = torch.float32) -> None:
    """Mark a frozen layer whose own weights were just stored below `original`."""
    setattr(module, _MARK, original)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a network computes in: its first floating parameter's, skipping stored layers (a network whose every
    floating parameter is stored computes in their original dtype; one without any, in float32)."""
    original: torch.dtype | None = None
    for m in model.modules():
        stored = getattr(m, _MARK, None)
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                if stored is None:
                    return p.dtype
                original = original or stored
    return original or torch.float32


def runs_stored(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a layer stored in `dtype` must cast `x` itself (outside autocast, another dtype)."""
    return x.dtype != dtype and not torch.is_autocast_enabled(x.device.type)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor] | None:
    """The layer's input: its first positional tensor, else its one tensor keyword (input=, hidden_states=...)."""
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return i, value
    named = [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return named[0] if len(named) == 1 else None


def _cast_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    found = _first_tensor(args, kwargs)
    dtype = module.weight.dtype
    stack = module.__dict__.setdefault(_CAST_BACK, [])  # a stack: correct also if the layer is re-entered
    if found is None or not runs_stored(found[1], dtype):
        stack.append(None)
        return None
    where, x = found
    stack.append(x.dtype)
    if isinstance(where, int):
        return (*args[:where], x.to(dtype), *args[where + 1:]), kwargs
    return args, {**kwargs, where: x.to(dtype)}


def _cast_out(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    stack = module.__dict__.get(_CAST_BACK)
    back = stack.pop() if stack else None
    return out.to(back) if back is not None and isinstance(out, torch.Tensor) else None


def _plain_frozen(m: nn.Module, skip: set[int], shared: Counter[int]) -> bool:
    weight = getattr(m, "weight", None)
    return (isinstance(m, nn.Linear | nn.Conv2d) and id(m) not in skip and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and not weight.requires_grad
            and all(not p.requires_grad and shared[id(p)] == 1 for p in m.parameters(recurse=False))
            # a layer that casts its weights itself (ComfyUI's manual cast) or already has its own forward
            # (FrozenCast, a host's patch) is left as it is
            and not getattr(m, "comfy_cast_weights", False) and "forward" not in m.__dict__
            and getattr(m, _MARK, None) is None)  # stored once already (its hooks are there)


def store_frozen_layers_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen float32 Linear / Conv2d layers of `model` that are not a LoRA layer's base in `dtype`; returns
    how many were converted. Left alone: trainable layers, weights not in float32, weights tied to another module,
    and layers whose parent reads their weight itself instead of calling them (nn.MultiheadAttention's out_proj)."""
    skip: set[int] = set()
    for m in model.modules():
        if hasattr(m, "frozen_dtype"):  # a LoRA layer: lora.store_frozen_in stores its base
            skip.add(id(m.base))
        elif isinstance(m, nn.MultiheadAttention):
            skip.update(id(c) for c in m.modules())
    shared = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    layers = [m for m in model.modules() if _plain_frozen(m, skip, shared)]
    for m in layers:
        m.to(dtype)
        m.register_forward_pre_hook(_cast_in, with_kwargs=True)
        m.register_forward_hook(_cast_out, with_kwargs=True)
        mark_stored(m)
    return len(layers)
