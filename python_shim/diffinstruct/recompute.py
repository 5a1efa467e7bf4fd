"""Activation checkpointing that is correct with LoRA roles and with blocks that modify their inputs in place.

A checkpointed block keeps only its inputs in the forward pass and runs again in the backward pass to rebuild its
activations (torch.utils.checkpoint, non-reentrant): one more forward of the block for its activations' memory.
Three things would make the second run compute something else than the first:

* LoRA roles. With a shared base (lora.RoleSwitch) backward runs after the role's `with switch.use(...)` has exited;
  the roles active at forward time are captured and restored around the second run.
* Blocks that modify an input in place (ComfyUI's Flux blocks add their residuals into `x`): each run works on a
  fresh copy of every tensor argument (also inside tuples, lists, dicts and dataclasses; one copy per distinct
  tensor, so aliases stay aliases), so the inputs kept for the second run stay as they were. Tensors made under
  inference mode (ComfyUI builds its options so) cannot be saved for backward and are passed as they are.
* Callers that change an argument after the block ran: the containers (ComfyUI's transformer_options, whose
  counters the UNet advances after each block) are rebuilt for each run from what they held at forward time, and
  every tensor goes to torch's checkpoint as an input, whose version check refuses in backward one changed in place
  afterwards ("modified by an inplace operation") instead of recomputing something else.

Under no_grad (the reference's and the TA's evaluation passes) a block runs as it is.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .lora import LoRALayer, RoleSwitch

_PLAIN = "_dipp_plain_forward"  # a block's own instance-level forward, when it had one before checkpointing


def _switches_in(module: nn.Module) -> list[RoleSwitch]:
    """The RoleSwitch objects of the LoRA layers inside `module` (each once)."""
    seen: dict[int, RoleSwitch] = {}
    for m in module.modules():
        if isinstance(m, LoRALayer):
            seen.setdefault(id(m.switch), m.switch)
    return list(seen.values())


def _with_roles(module: nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run under the LoRA roles active inside `module` now."""
    switches = _switches_in(module)
    roles = [s.active for s in switches]

    def run(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for switch, role in zip(switches, roles, strict=True):
                stack.enter_context(switch.use(role))
            return fn(*args, **kwargs)

    return run


def role_aware_checkpoint(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """torch.utils.checkpoint of `module(*args, **kwargs)` that recomputes under the LoRA roles of the forward pass
    (plain checkpointing would recompute a shared base as the bare base and give the adapters wrong gradients)."""
    return torch.utils.checkpoint.checkpoint(_with_roles(module, module.__call__), *args, use_reentrant=False,
                                             **kwargs)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where the index-th distinct tensor of a block's arguments goes back."""

    index: int


def _snapshot(value: Any, found: list[torch.Tensor], seen: dict[int, int]) -> Any:
    """`value` with its containers copied (tuples, lists, dicts, dataclasses: as they are now) and each tensor that
    can be saved for backward replaced by its _Slot (one per distinct tensor, so aliases stay aliases)."""
    if isinstance(value, torch.Tensor):
        if value.is_inference():  # made under inference mode (ComfyUI's options): never saved, never changed
            return value
        if id(value) not in seen:
            seen[id(value)] = len(found)
            found.append(value)
        return _Slot(seen[id(value)])
    return _rebuild(value, lambda v: _snapshot(v, found, seen))


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    return _rebuild(value, lambda v: _fill(v, tensors))


def _rebuild(value: Any, each: Callable[[Any], Any]) -> Any:
    """A copy of the container `value` with `each` applied to its items; anything else as it is."""
    if isinstance(value, torch.Size) or isinstance(value, str | bytes):
        return value
    if isinstance(value, tuple):
        items = [each(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return type(value)(each(v) for v in value)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps a dict subclass (defaultdict's factory)
        for key, item in value.items():
            out[key] = each(item)
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(out, f.name, each(getattr(value, f.name)))  # also a frozen dataclass
        return out
    return value


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__.get(_PLAIN) or types.MethodType(type(self).forward, self)
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    # every tensor, also inside containers, goes to torch's checkpoint positionally (it keeps each with its version,
    # infers the device and saves the RNG state from them); the containers are rebuilt, fresh, for each run
    tensors: list[torch.Tensor] = []
    template = _snapshot((args, kwargs), tensors, {})

    def run(*given: torch.Tensor) -> Any:
        # fresh copies: the block may change its inputs in place (ComfyUI's Flux blocks do)
        a, k = _fill(template, [t.clone() for t in given])
        return inner(*a, **k)

    return torch.utils.checkpoint.checkpoint(_with_roles(self, run), *tensors, use_reentrant=False)


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Make each block recompute its activations in backward (see the module docstring); returns how many blocks
    were changed (a block already checkpointed is left as it is)."""
    changed = 0
    for block in blocks:
        if is_checkpointed(block):
            continue
        if "forward" in block.__dict__:  # a forward of its own (a host's patch): wrapped, kept to restore
            block.__dict__[_PLAIN] = block.__dict__["forward"]
        block.forward = types.MethodType(_checkpointed_forward, block)
        changed += 1
    return changed


def uncheckpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        if is_checkpointed(block):
            del block.__dict__["forward"]
            if _PLAIN in block.__dict__:
                block.forward = block.__dict__.pop(_PLAIN)
