"""recompute.py: checkpointed blocks give the gradients of the plain network bit for bit (LoRA roles on a shared
base, blocks that add into their input in place, keyword and dict arguments, tuple outputs), keep less for backward,
refuse an input changed after the block ran, and leave no_grad passes alone; comfyui/checkpointing.py finds the
blocks of DiT-style block lists and of UNet containers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from diffinstruct import lora, recompute
from diffinstruct.comfyui import checkpointing as comfy_checkpointing
from diffinstruct.errors import ConfigError

WIDTH = 16


class Block(nn.Module):
    """Adds its residual into its input in place, as ComfyUI's Flux blocks do; reads a dict option."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x.clone()) * options["scale"]))) * gate
        x += h  # in place on the input
        return x, h.mean(dim=-1)


class Net(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.gate = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x))
        x = self.inp(x)  # what the blocks add into: nothing else keeps it for backward
        options = {"scale": 1.0}
        side = 0
        for block in self.blocks:
            x, s = block(x, gate=gate, options=options)
            options["scale"] += 0.5  # the caller advances its options after each block (ComfyUI's UNet does)
            side = side + s
        return x + side.unsqueeze(-1)


def _shared_net(seed: int = 0) -> tuple[Net, lora.RoleSwitch, dict[str, list[nn.Parameter]]]:
    torch.manual_seed(seed)
    net = Net()
    switch, params = lora.attach_lora(net, roles=("ta", "generator"), rank=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero adapters: the roles compute different functions
        for p in params["ta"] + params["generator"]:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net, switch, params


def _grads(net: Net, switch: lora.RoleSwitch, params: dict[str, list[nn.Parameter]]) -> list[torch.Tensor]:
    """The generator's and the TA's gradients from one backward each, taken after their role's scope has exited."""
    x = torch.randn(4, 5, WIDTH, generator=torch.Generator().manual_seed(7))
    outs = []
    for role in ("generator", "ta"):
        with switch.use(role):
            out = net(x)
        outs.append(out)
    for out in outs:
        out.square().mean().backward()
    return [p.grad.clone() for role in ("generator", "ta") for p in params[role]]


def _saved_bytes(net: Net, switch: lora.RoleSwitch) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), switch.use("generator"):
        net(torch.randn(4, 5, WIDTH))
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_checkpointed_blocks_give_the_same_gradients_bit_for_bit_and_keep_less():
    plain, switch_a, params_a = _shared_net()
    ckpt, switch_b, params_b = _shared_net()
    assert recompute.checkpoint_blocks(ckpt.blocks) == 3
    assert recompute.checkpoint_blocks(ckpt.blocks) == 0  # already checkpointed
    a, b = _grads(plain, switch_a, params_a), _grads(ckpt, switch_b, params_b)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(bool(x.abs().sum() > 0) for x in a)
    assert _saved_bytes(ckpt, switch_b) < 0.5 * _saved_bytes(plain, switch_a)


def test_without_the_roles_restored_the_recomputation_is_another_network(monkeypatch):
    """Recomputing under the role active at backward time (what plain checkpointing does once the role's scope has
    exited: the bare base) runs another network; torch notices it here by the count of saved tensors."""
    ckpt, switch, params = _shared_net()
    recompute.checkpoint_blocks(ckpt.blocks)
    monkeypatch.setattr(recompute, "_with_roles", lambda module, fn: fn)
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        _grads(ckpt, switch, params)


def test_an_input_changed_after_the_block_ran_is_refused_in_backward():
    torch.manual_seed(0)
    block = Block()
    recompute.checkpoint_blocks([block])
    x = torch.randn(2, 3, WIDTH, requires_grad=True)
    gate = torch.ones(2, 3, WIDTH)
    out, _ = block(x * 1.0, gate=gate, options={"scale": 1.0})
    gate.mul_(2.0)  # after the block ran
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_no_grad_passes_run_the_block_as_it_is_and_undo_restores_it(monkeypatch):
    torch.manual_seed(0)
    block = Block()
    recompute.checkpoint_blocks([block])
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        block(torch.randn(2, 3, WIDTH), gate=torch.ones(1), options={"scale": 1.0})
    assert not calls
    block(torch.randn(2, 3, WIDTH, requires_grad=True), gate=torch.ones(1), options={"scale": 1.0})
    assert calls
    recompute.uncheckpoint_blocks([block])
    assert "forward" not in block.__dict__ and not recompute.is_checkpointed(block)


def test_a_deep_copy_of_a_checkpointed_network_is_checkpointed_on_its_own_weights():
    net, switch, params = _shared_net()
    recompute.checkpoint_blocks(net.blocks)
    twin = copy.deepcopy(net)
    assert all(recompute.is_checkpointed(b) for b in twin.blocks)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        twin.blocks[0].fc1.base.weight.add_(1.0)
    assert not torch.equal(net(x), twin(x))


# ---------------------------------------------------------------------------------------------- ComfyUI's layouts
class TimestepEmbedSequential(nn.Sequential):  # the name ComfyUI's UNet container has
    pass


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(4, 8, 3)),
                                           TimestepEmbedSequential(Block(), Block())])
        self.middle_block = TimestepEmbedSequential(Block(), nn.Identity(), Block())
        self.output_blocks = nn.ModuleList([TimestepEmbedSequential(Block())])
        self.out = nn.Sequential(nn.Linear(WIDTH, WIDTH))


class DiTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList(Block() for _ in range(2))
        self.single_blocks = nn.ModuleList(Block() for _ in range(3))
        self.embedders = nn.ModuleList([nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))])  # mixed: not blocks


class BaseModelLike(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = net


def test_blocks_of_a_dit_are_its_block_lists():
    net = DiTLike()
    assert comfy_checkpointing.blocks_of(net) == [*net.double_blocks, *net.single_blocks]


def test_blocks_of_a_unet_are_the_layers_inside_its_containers():
    net = UNetLike()
    expected = [net.middle_block[0], net.middle_block[2], *net.input_blocks[1], net.output_blocks[0][0]]
    assert sorted(map(id, comfy_checkpointing.blocks_of(net))) == sorted(map(id, expected))


def test_enable_checkpoints_every_diffusion_model_once_and_names_one_without_blocks():
    model = BaseModelLike(DiTLike())
    assert comfy_checkpointing.enable(nn.ModuleList([model, model])) == 5
    assert all(recompute.is_checkpointed(b) for b in model.diffusion_model.single_blocks)
    with pytest.raises(ConfigError, match="gradient_checkpointing: Linear has no block list"):
        comfy_checkpointing.enable(BaseModelLike(nn.Linear(2, 2)))


class PairBlock(nn.Module):
    """Takes its tensors only by keyword and inside a tuple, and adds into the first one in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, *, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        a += torch.tanh(self.fc(b))
        return a * 1.0


def _pair_grads(checkpointed: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    blocks = nn.ModuleList(PairBlock() for _ in range(2))
    if checkpointed:
        recompute.checkpoint_blocks(blocks)
    x = torch.randn(3, WIDTH, requires_grad=True)
    side = torch.randn(3, WIDTH, requires_grad=True)
    h = x * 1.0
    for block in blocks:
        h = block(pair=(h, side * 1.0))
    h.square().sum().backward()
    return [x.grad, side.grad, *(p.grad for p in blocks.parameters())]


@dataclasses.dataclass
class Mod:
    """A dataclass of tensors as a block argument (ComfyUI's Chroma passes its modulations so)."""

    shift: torch.Tensor
    scale: float


class AliasBlock(nn.Module):
    """Adds into its input, then reads the same tensor through its options (an alias), and a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, options: dict, mod: Mod) -> torch.Tensor:
        x += torch.tanh(self.fc(x.clone()))
        return self.fc(options["same"] * options["sigmas"].mean()) + mod.shift * mod.scale


def _alias_grads(checkpointed: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    block = AliasBlock()
    if checkpointed:
        recompute.checkpoint_blocks([block])
    with torch.inference_mode():  # as ComfyUI builds its transformer_options
        sigmas = torch.full((2,), 0.5)
    x = torch.randn(2, WIDTH, requires_grad=True)
    shift = torch.randn(2, WIDTH, requires_grad=True)
    h = x * 1.0
    out = block(h, {"same": h, "sigmas": sigmas}, Mod(shift * 1.0, 2.0))
    out.square().sum().backward()
    return [x.grad, shift.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("grads", [_pair_grads, _alias_grads], ids=["keyword-only-tuples", "aliases-dataclasses"])
def test_arguments_inside_containers_are_recomputed_faithfully(grads):
    """Keyword-only calls with tensors in tuples; aliases, a dataclass and an inference-mode tensor."""
    plain, ckpt = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt, strict=True))


def _run_then_change(kind: str) -> torch.Tensor:
    """A checkpointed block's output, after a tensor inside one of its container arguments was changed in place."""
    torch.manual_seed(0)
    later = torch.randn(2, WIDTH)
    x = torch.randn(2, WIDTH, requires_grad=True) * 1.0
    if kind == "tuple":
        block: nn.Module = PairBlock()
        recompute.checkpoint_blocks([block])
        out = block(pair=(x, later))
    else:
        block = AliasBlock()
        recompute.checkpoint_blocks([block])
        out = block(x, {"same": torch.ones(2, WIDTH), "sigmas": torch.ones(2)}, Mod(later, 2.0))
    later.add_(1.0)  # after the block ran
    return out


@pytest.mark.parametrize("kind", ["tuple", "dataclass"])
def test_a_tensor_inside_a_container_changed_after_the_block_ran_is_refused(kind):
    out = _run_then_change(kind)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
