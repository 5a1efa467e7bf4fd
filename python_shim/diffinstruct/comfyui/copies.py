"""A training copy of a ComfyUI network: its own tensors (no inference tensors, nothing shared with the graph's
MODEL), layers set to compute in the training dtype or to cast frozen low-precision weights as ComfyUI does, and
the in-place residuals of some families made safe for autograd."""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own alias
from torch import nn

# ComfyUI networks whose blocks add their residual in place (`x += ...`, `x.addcmul_(...)`) after a LayerNorm
# saved x for backward; autograd then refuses to go back through them (see _clone_norm_inputs)
INPLACE_RESIDUAL_MODULES = ("comfy.ldm.flux.layers", "comfy.ldm.chroma.layers", "comfy.ldm.chroma_radiance.layers")


def _clone_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


def _clone_norm_inputs(module: nn.Module) -> int:
    """Flux and Chroma blocks add their residual into x in place after a LayerNorm saved x for backward. Their
    norms get a copy of x (when a gradient is being recorded), so the in-place add no longer changes what backward
    reads; sampling is untouched. Returns the number of norms hooked."""
    hooked = 0
    for block in module.modules():
        if type(block).__module__ not in INPLACE_RESIDUAL_MODULES:
            continue
        for child in block.children():
            if isinstance(child, nn.LayerNorm):
                child.register_forward_pre_hook(_clone_input)
                hooked += 1
    return hooked


def _set_cast(m: nn.Module, cast: bool) -> None:
    """A comfy.ops layer's per-forward weight cast on or off, and its weight patches dropped (baked in at load)."""
    if hasattr(m, "comfy_cast_weights"):
        m.comfy_cast_weights = cast
    if isinstance(getattr(m, "weight_function", None), list):
        m.weight_function = []
    if isinstance(getattr(m, "bias_function", None), list):
        m.bias_function = []


def _plain_layers(module: nn.Module) -> None:
    """Make comfy.ops layers run their plain torch forward on the copy: no per-forward casts or patches
    (weights are already in the training dtype and ComfyUI's patches are baked in at load)."""
    for m in module.modules():
        _set_cast(m, False)


class FrozenCast(torch.autograd.Function):
    """A frozen Linear / Conv2d whose weight is stored in low precision: the float copy the matmul needs is made in
    the forward and again in the backward, and only the stored weight is kept for backward. Casting in the layer
    (ComfyUI's manual cast) would keep the float copy of every weight alive until backward: 2-4 bytes per
    parameter more than the base itself."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conv: tuple[Any, ...] | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conv, ctx.x_shape, ctx.x_dtype = conv, x.shape, x.dtype
        w = weight.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, b) if conv is None else F.conv2d(x, w, b, *conv)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (weight,) = ctx.saved_tensors
        w = weight.to(grad.dtype)
        if ctx.conv is None:
            grad_x = grad @ w
        else:
            stride, padding, dilation, groups = ctx.conv
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, stride, padding, dilation, groups)
        return grad_x.to(ctx.x_dtype), None, None, None


def _frozen_cast_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self, nn.Conv2d):
        return FrozenCast.apply(x, self.weight, self.bias, (self.stride, self.padding, self.dilation, self.groups))
    # a 2-D matmul inside, reshaped outside: a custom Function's output must not be a view, or the LoRA's in-place
    # add onto it is refused
    flat = FrozenCast.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, None)
    return flat.view(*x.shape[:-1], flat.shape[-1])


def _cast_layers(module: nn.Module) -> None:
    """Frozen fp8 / bf16 weights stay as they were loaded: Linear and Conv2d layers cast them in FrozenCast, the
    other comfy.ops layers (norms, embeddings) cast them to the input's dtype on every forward (ComfyUI's manual
    cast); weight patches are baked in at load."""
    for m in module.modules():
        _set_cast(m, True)
        weight = getattr(m, "weight", None)
        plain_conv = isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        if isinstance(weight, torch.Tensor) and weight.element_size() < 4 and (isinstance(m, nn.Linear)
                                                                               or plain_conv):
            m.forward = types.MethodType(_frozen_cast_forward, m)


def low_precision(module: nn.Module) -> torch.dtype | None:
    """The dtype of a network's weights when they are below float32 (bf16, fp16, fp8 as loaded), else None."""
    for p in module.parameters():
        if p.is_floating_point() and p.element_size() < 4:
            return p.dtype
    return None


def copy_base_model(base: nn.Module, dtype: torch.dtype, keep_weight_dtype: bool = False) -> nn.Module:
    """A BaseModel sharing model_sampling / latent_format with `base` but owning a copy of its network.

    keep_weight_dtype: weights loaded below float32 (fp8, bf16) stay so, frozen, and compute in `dtype` through
    ComfyUI's own casting layers (the shared base of LoRA training); otherwise every weight becomes `dtype`."""
    new = copy.copy(base)
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(new, attr, OrderedDict(getattr(base, attr)))
    for attr in ("current_patcher",):
        if attr in new.__dict__:
            new.__dict__[attr] = None
    net = copy.deepcopy(base.diffusion_model)  # clones every tensor: no inference tensors remain
    if keep_weight_dtype and low_precision(net) is not None:
        _cast_layers(net)
        new.manual_cast_dtype = dtype  # apply_model casts the input and the conditioning to it
    else:
        net = net.to(dtype)
        _plain_layers(net)
        new.manual_cast_dtype = None
        if hasattr(net, "dtype"):
            net.dtype = dtype
    _clone_norm_inputs(net)
    new.diffusion_model = net
    return new
