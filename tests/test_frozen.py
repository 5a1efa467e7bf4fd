"""frozen.py: plain frozen Linear / Conv2d layers stored in bf16 run outside autocast in the input's dtype, keep
the network's compute dtype float32 (also when every weight is stored, and in a deep copy), deep-copy and pickle,
and leave alone the layers they cannot take over (trainable, tied, read by their parent)."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from diffinstruct import frozen


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).requires_grad_(False)


def test_stored_layers_run_outside_autocast_in_the_inputs_dtype_and_match_autocast_inside():
    net = _net()
    plain = copy.deepcopy(net)
    assert frozen.store_frozen_layers_in(net) == 2
    assert all(m.weight.dtype == torch.bfloat16 for m in net if isinstance(m, nn.Linear))
    x = torch.randn(4, 8)
    out = net(x)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(x), plain(x))  # autocast's per-pass cast rounds the same way
    assert torch.equal(net[0](input=x), net[0](x))  # the keyword form of Linear's argument


def test_the_compute_dtype_stays_float32_when_every_weight_is_stored_and_in_a_copy():
    net = _net()
    frozen.store_frozen_layers_in(net)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert frozen.compute_dtype(net) == torch.float32
    twin = copy.deepcopy(net)
    assert frozen.compute_dtype(twin) == torch.float32
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), net(x)) and twin(x).dtype == torch.float32


def test_a_stored_network_pickles():
    net = _net()
    frozen.store_frozen_layers_in(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(2, 8)
    assert torch.equal(back(x), net(x)) and frozen.compute_dtype(back) == torch.float32


def test_layers_it_cannot_take_over_are_left_alone():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2).requires_grad_(False)  # reads out_proj.weight itself
    tied_a, tied_b = nn.Linear(8, 8), nn.Linear(8, 8)
    tied_b.weight = tied_a.weight
    trainable = nn.Linear(8, 8)
    plain = nn.Linear(8, 8).requires_grad_(False)
    model = nn.ModuleDict({"attn": attn, "a": tied_a.requires_grad_(False), "b": tied_b, "t": trainable,
                           "plain": plain})
    model["b"].bias.requires_grad_(False)
    assert frozen.store_frozen_layers_in(model) == 1  # only the plain frozen layer
    assert plain.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if not name.startswith("plain."))
    x = torch.randn(5, 1, 8)
    out, _ = attn(x, x, x)
    assert out.dtype == torch.float32


def test_storing_twice_changes_nothing_and_a_keyword_input_is_cast():
    net = _net()
    frozen.store_frozen_layers_in(net)
    assert frozen.store_frozen_layers_in(net) == 0
    x = torch.randn(2, 8)
    assert net(x).dtype == torch.float32

    class Named(nn.Linear):  # a subclass called by another keyword, as diffusers' LoRACompatibleLinear is
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states)

    layer = Named(8, 4).requires_grad_(False)
    frozen.store_frozen_layers_in(layer)
    assert layer(hidden_states=x).dtype == torch.float32
