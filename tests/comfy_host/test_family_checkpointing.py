"""Gradient checkpointing on every text-to-image family of the tested ComfyUI (comfyui/checkpointing.py).

Per family (the tiny random instances of families.py, loaded by ComfyUI's loaders): the pack's trainable copy with
LoRA on a shared base finds the family's blocks, and the generator's LoRA gradients with checkpointed blocks are
the plain network's to float32 rounding (measured: up to 2e-6 of the largest gradient; where every block adds into
one input, such as the time embedding, the contributions arrive in another order) while the forward keeps fewer
bytes for backward (0.02-0.6x at these tiny sizes). Then Align with gradient_checkpointing on trains the same LoRA
as with it off, to the same rounding.

Runs only with COMFYUI_PATH, like the rest of tests/comfy_host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy").is_dir():
    pytest.skip("real-ComfyUI tests skipped: set COMFYUI_PATH to a ComfyUI checkout (with its requirements and CPU "
                "torch installed) to run them", allow_module_level=True)

import families  # noqa: E402
import torch  # noqa: E402
from test_comfy_host import declarations, host  # noqa: E402, F401 - host is a fixture

NAMES = [f.name for f in families.FAMILIES]


def _loaded(host, name: str):  # noqa: F811 - the fixture imported above
    family = families.BY_NAME[name]
    stem = "ckpt_" + name.replace(" ", "_").replace(".", "")
    files = families.load(family, families.save(family, families.build(family, seed=0), host.tmp / "families" / stem))
    return family, files, stem


def _generator(model, family):
    """The engine's one-step generator on the pack's trainable copy (shared base, LoRA with non-zero adapters)."""
    from diffinstruct import engine
    from diffinstruct.comfyui import host as comfy_host

    copy = comfy_host.trainable_copy(model, keep_weight_dtype=True)
    side = family.latent_size
    models = engine.assemble(copy, (family.latent_channels, side, side), mode="shared", rank=4, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in models.generator_params:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return copy, models


def _step(models, blocks, cond, family) -> tuple[list[torch.Tensor], int]:
    """One forward with grad and backward of the generator: its LoRA gradients and the bytes kept for backward
    (distinct storages, weights excluded): what autograd saves, and the blocks' inputs (a checkpointed block keeps
    them itself, out of autograd's sight)."""
    side = family.latent_size
    z = torch.randn((1, family.latent_channels, side, side), generator=torch.Generator().manual_seed(2))
    weights = {p.untyped_storage().data_ptr() for p in models.generator.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and t.is_floating_point():
            kept.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def inputs(module, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                keep(value)

    hooks = [b.register_forward_pre_hook(inputs, with_kwargs=True) for b in blocks]
    for p in models.generator_params:
        p.grad = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = models.generator(z, cond)
    finally:
        for h in hooks:
            h.remove()
    out.float().square().mean().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in models.generator_params]
    return grads, sum(kept.values())


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_blocks_give_the_same_gradients_with_less_kept(host, name):  # noqa: F811
    from diffinstruct.comfyui import checkpointing
    from diffinstruct.comfyui import host as comfy_host

    family, files, _ = _loaded(host, name)
    clip = families.clip_for(family)
    side = family.latent_size
    cond = comfy_host.encode_conditioning(files.model, families.conditioning(clip, "a cat")[0], (side, side))
    twin, plain = _generator(files.model, family)
    copy, ckpt = _generator(files.model, family)
    blocks = checkpointing.enable(copy)

    def blocks_in(module):
        return [b for net in checkpointing.diffusion_models(module) for b in checkpointing.blocks_of(net)]

    with torch.inference_mode(False), torch.enable_grad():
        grads_plain, kept_plain = _step(plain, blocks_in(twin), cond, family)
        grads_ckpt, kept_ckpt = _step(ckpt, blocks_in(copy), cond, family)
    print(f"\n{name}: {blocks} blocks checkpointed; kept for backward {kept_plain / 2**20:.2f} MiB -> "
          f"{kept_ckpt / 2**20:.2f} MiB ({kept_ckpt / kept_plain:.2f}x)")
    assert blocks > 0 and len(grads_plain) == len(grads_ckpt) > 0
    scale = max(float(a.abs().max()) for a in grads_plain)
    assert scale > 0
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale)
    assert kept_ckpt < kept_plain


@pytest.mark.parametrize("name", ["SD1.5", "Flux.1 dev"])
def test_align_with_gradient_checkpointing_trains_the_same_lora(host, name):  # noqa: F811
    family, files, stem = _loaded(host, name)
    clip = families.clip_for(family)
    mappings = declarations(host)
    size = family.latent_size * 8
    outs = []
    with torch.inference_mode():  # as ComfyUI runs nodes
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "auto")[0]
        for on in (False, True):
            out = mappings["DIPPAlign"]().align(files.model, clip, files.vae, "a cat\na dog", reward, 100.0, 1.0, 3,
                                                width=size, height=size, batch_size=2, checkpoint_every=3,
                                                gradient_checkpointing=on,
                                                checkpoint_dir=str(host.tmp / "ckpt_runs" / f"{stem}_{on}"))["result"]
            outs.append(out[1].tensors)
    assert outs[0].keys() == outs[1].keys() and outs[0]
    ups = [k for k in outs[0] if k.endswith("lora_up.weight")]
    off, on = (torch.cat([o[k].flatten().float() for k in ups]) for o in outs)
    assert bool(off.abs().max() > 0)  # the up weights start at zero: what training moved
    # Adam turns a gradient that is only rounding noise (SD1.5's timestep-embedding layers, ~1e-9, before a
    # GroupNorm that removes their mean) into steps of noise, so compare the whole update, not each weight
    rel = float((on - off).norm() / off.norm())
    print(f"\n{name}: Align with / without checkpointing, up weights differ by {rel:.1e} of their norm")
    assert rel < 1e-2
    for k in outs[0]:  # the down weights (random init): within a tenth of one Adam step (lr 1e-4)
        if k not in ups:
            torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-4, atol=1e-5)
