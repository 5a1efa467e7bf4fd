"""Gradient checkpointing of the networks ComfyUI loads: which modules are a family's blocks.

A DiT's blocks are the elements of its block lists (Flux's double_blocks / single_blocks, SD3's joint_blocks,
Qwen-Image's transformer_blocks, Lumina's layers...): every nn.ModuleList directly under the diffusion model whose
elements share one class. A UNet's lists hold TimestepEmbedSequential containers, which ComfyUI's UNet does not call
as modules (forward_timestep_embed loops over their layers), so there the layers inside are the blocks, and so are
the middle block's. recompute.checkpoint_blocks then makes each block recompute its activations in backward.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import ConfigError
from ..lora import LoRALayer
from ..recompute import checkpoint_blocks

_CONTAINER = "TimestepEmbedSequential"  # ComfyUI's UNet container: its layers are called one by one


def _composite(module: nn.Module) -> bool:
    """Whether recomputing `module` can save anything: it holds layers of its own (a lone conv, or a LoRA-wrapped
    one, keeps only its input either way)."""
    return not isinstance(module, LoRALayer) and any(True for _ in module.children())


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    return (layer for layer in module.children() if _composite(layer))


def diffusion_models(module: nn.Module) -> list[nn.Module]:
    """The ComfyUI diffusion models inside `module` (a BaseModel's `diffusion_model`, each once)."""
    seen: dict[int, nn.Module] = {}
    for m in module.modules():
        net = getattr(m, "diffusion_model", None)
        if isinstance(net, nn.Module):
            seen.setdefault(id(net), net)
    return list(seen.values())


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """The blocks of one diffusion model (module docstring); empty when it has no block list."""
    found: list[nn.Module] = []
    for child in net.children():
        if type(child).__name__ == _CONTAINER:  # a UNet's middle block
            found.extend(_layers(child))
        elif isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1:
            for element in child:
                if type(element).__name__ == _CONTAINER:
                    found.extend(_layers(element))
                elif _composite(element):
                    found.append(element)
    return found


def enable(module: nn.Module) -> int:
    """Checkpoint the blocks of every ComfyUI diffusion model inside `module`; returns how many blocks it found
    (ConfigError when a model has none: the option cannot do anything for it)."""
    nets = diffusion_models(module)
    if not nets:
        raise ConfigError(f"gradient_checkpointing: {type(module).__name__} holds no ComfyUI diffusion model (it "
                          "checkpoints the blocks of a MODEL ComfyUI loaded); turn gradient_checkpointing off")
    count = 0
    for net in nets:
        blocks = blocks_of(net)
        if not blocks:
            raise ConfigError(f"gradient_checkpointing: {type(net).__name__} has no block list to checkpoint; "
                              "turn gradient_checkpointing off for this model")
        checkpoint_blocks(blocks)
        count += len(blocks)
    return count
