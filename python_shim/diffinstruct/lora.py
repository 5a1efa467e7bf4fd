"""LoRA adapters on one shared frozen base, switched by role.

Reference = base (no adapter active), TA = base + LoRA_TA, generator = base +
LoRA_G: three networks for the price of one set of weights. `RoleSwitch.use`
selects the active role for a forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .frozen import mark_stored, runs_stored, store_frozen_layers_in


class RoleSwitch:
    """Which adapter set is active; None means the bare base."""

    def __init__(self) -> None:
        self.active: str | None = None

    @contextlib.contextmanager
    def use(self, role: str | None) -> Iterator[None]:
        previous, self.active = self.active, role
        try:
            yield
        finally:
            self.active = previous


class LoRALayer(nn.Module):
    """A frozen Linear or Conv2d plus one low-rank update per role: W + (alpha / r) up @ down."""

    def __init__(self, base: nn.Module, roles: Sequence[str], rank: int, alpha: float, switch: RoleSwitch) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.switch = switch
        self.scale = alpha / rank
        self.frozen_dtype: torch.dtype | None = None  # set by store_frozen_in
        self.adapters = nn.ModuleDict()
        for role in roles:
            if isinstance(base, nn.Linear):
                down = nn.Linear(base.in_features, rank, bias=False)
                up = nn.Linear(rank, base.out_features, bias=False)
            elif isinstance(base, nn.Conv2d):
                down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                 bias=False)
                up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            else:
                raise TypeError(f"LoRA supports Linear and Conv2d, got {type(base).__name__}")
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)  # starts exactly at the base
            dtype = adapter_dtype(base)
            down.to(dtype)
            up.to(dtype)
            self.adapters[role] = nn.Sequential(down, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_dtype is not None and runs_stored(x, self.frozen_dtype):
            # a base stored in bf16 (store_frozen_in) outside autocast: run it in its own dtype
            out = self.base(x.to(self.frozen_dtype)).to(x.dtype)
        else:
            out = self.base(x)
        role = self.switch.active
        if role is not None and role in self.adapters:
            delta = self.adapters[role](x)
            # in place, the scale riding on the add: one pass over the full-size output and no new tensor (Linear and
            # Conv2d never keep their output for backward, so autograd allows it); 1.0 is the default scale
            out = out.add_(delta) if self.scale == 1.0 else out.add_(delta, alpha=self.scale)
        return out


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The base weight's dtype, except for a base that casts its weights to the input's dtype (ComfyUI's
    manual-cast layers holding fp8 / bf16 weights): its inputs, and so its adapters, are float32."""
    if getattr(base, "comfy_cast_weights", False) or base.weight.element_size() < 2:
        return torch.float32
    return base.weight.dtype


def store_frozen_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keep the frozen float32 weights of `model` in `dtype` (bf16 training): every LoRA layer's base, and the plain
    frozen Linear / Conv2d layers (frozen.store_frozen_layers_in: full mode's reference, layers without an adapter).
    Autocast then uses them as they are instead of casting every weight on every pass, with the same values (the
    cast it did rounds the same way), and they take half the memory. Outside autocast such a layer runs in `dtype`.
    Returns the number of layers converted."""
    converted = 0
    for module in model.modules():
        if isinstance(module, LoRALayer) and getattr(module.base, "weight", None) is not None:
            if module.base.weight.dtype == torch.float32 and not module.base.weight.requires_grad:
                module.base.to(dtype)
                mark_stored(module.base)
                module.frozen_dtype = dtype
                converted += 1
    return converted + store_frozen_layers_in(model, dtype)


def default_target(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d) and getattr(module, "groups", 1) == 1


def attach_lora(
    model: nn.Module,
    roles: Sequence[str] = ("ta", "generator"),
    rank: int = 8,
    alpha: float | None = None,
    target: Callable[[str, nn.Module], bool] = default_target,
) -> tuple[RoleSwitch, dict[str, list[nn.Parameter]]]:
    """Freezes model, wraps every targeted layer; returns the switch and the trainable parameters per role."""
    switch = RoleSwitch()
    model.requires_grad_(False)
    params: dict[str, list[nn.Parameter]] = {role: [] for role in roles}
    targets = [(name, m) for name, m in model.named_modules() if name and target(name, m)]
    if not targets:
        raise ValueError("no Linear/Conv2d layer matched the LoRA target")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALayer(module, roles, rank, float(alpha if alpha is not None else rank), switch)
        setattr(parent, child, layer)
        for role in roles:
            for p in layer.adapters[role].parameters():
                p.requires_grad_(True)
                params[role].append(p)
    return switch, params


def lora_state_dict(model: nn.Module, role: str) -> dict[str, torch.Tensor]:
    """The adapter weights of one role, keyed by layer name."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and role in module.adapters:
            down, up = module.adapters[role]
            out[f"{name}.lora_down.weight"] = down.weight.detach()
            out[f"{name}.lora_up.weight"] = up.weight.detach()
            out[f"{name}.alpha"] = torch.tensor(module.scale * down.weight.shape[0])
    return out
