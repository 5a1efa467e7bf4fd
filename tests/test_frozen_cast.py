"""FrozenCast: frozen Linear / Conv2d layers whose weights stay in fp8 / bf16 (a MODEL loaded with a weight dtype)
compute exactly what a float copy of the weight computes, and keep only the stored weight for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffinstruct.comfyui.copies import _cast_layers

DTYPES = [torch.float8_e4m3fn, torch.bfloat16]


def saved_during(fn):
    """(shape, dtype) of every tensor autograd saves while `fn` runs, and fn's result."""
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_same_function_and_gradient_as_a_float_copy(dtype, kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1, stride=1)
    layer.requires_grad_(False)
    x = torch.randn((3, 5, 16) if kind == "linear" else (2, 6, 7, 7), requires_grad=True)
    reference = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    layer.to(dtype)
    with torch.no_grad():  # the float copy the stored weight stands for
        reference.weight.copy_(layer.weight.float())
        reference.bias.copy_(layer.bias.float())
    reference.requires_grad_(False)
    _cast_layers(layer)

    saved, out = saved_during(lambda: layer(x))
    assert out.dtype == torch.float32
    assert tuple(layer.weight.shape) not in [s for s, d in saved if d == torch.float32], "no float weight copy kept"
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    (want,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert layer.weight.dtype == dtype


def test_float32_layers_are_left_alone():
    layer = nn.Linear(4, 4)
    _cast_layers(layer)
    assert "forward" not in vars(layer)
