"""Peak memory of one DI++ iteration at full size for SDXL, Flux.1 dev and Qwen-Image, per memory mode and dtype.

Usage: COMFYUI_PATH=/tmp/comfy PYTHONPATH=python_shim python bench/family_memory.py [--rank R] [--quick]
                                                                [--json OUT] [--reuse EARLIER.json]

Three measured ingredients, combined into a Markdown table against 24 / 48 / 80 GB cards (docs/MEMORY.md has the
method in words and the numbers of a run):

1. Parameter counts at full size: each network is built by ComfyUI's own `comfy.supported_models` class from the
   unet config ComfyUI's model_detection returns for the family's files, on the meta device (no memory), and the
   package's `attach_lora` is run on it to count exactly what LoRA mode wraps and adds.
2. Bytes per parameter: what the engine allocates (host.trainable_copy copies in float32; store_frozen_in keeps the
   frozen Linear/Conv2d layers in bf16 when bf16 is on: the shared base's, full mode's reference's; FusedAdam keeps
   one float32 second moment, beta1 = 0; EMA a clone of the generator's trainable weights; a gradient in the
   parameter's dtype). Confirmed on a tiny Flux built
   through ComfyUI: one DITrainer.train_step per mode, then the bytes the models, optimisers and EMA hold are counted,
   and the gradients both networks hold at once (the generator's wait for the TA's step in the "reuse" pass plan).
3. Activations measured, one fresh subprocess per point: the generator's forward (grad) at batch 1, then the TA's and
   the reference's no-grad passes (the reference on cond + uncond as one batch of 2, reference_pass "joint"), then
   the generator's backward: the trainer's order, so the peak covers the no-grad passes on top of the activations the
   generator holds. The networks are the families' ComfyUI modules at full width, prepared by the pack's own
   comfyui.copies.copy_base_model (plain layers, Flux's norm-input clones) and engine.assemble; DiTs at depth
   1-2 (per-block cost = difference), SDXL's whole UNet at small latents, then fitted linear in tokens and scaled
   to full depth and 1024 px. Bytes are torch's CPU allocations (torch.profiler memory timeline: every tensor the
   allocator hands out; full-mode gradients are dropped as they land, being counted as trainable state), which is
   what a GPU's caching allocator is asked for, less its rounding and fragmentation.
   The RSS high-water mark is recorded alongside as a cross-check.

Attention: ComfyUI on the CPU picks sub-quadratic attention, on NVIDIA PyTorch's SDPA. The children set ComfyUI's
--use-pytorch-cross-attention so the CPU runs SDPA too; torch's CPU SDPA is a flash kernel (saves output and
log-sum-exp, O(tokens) memory), the GPU path's memory semantics. The frozen weights are tied by shape in the
activation runs (all layers of one shape share one tensor): memory does not depend on weight values, and a whole
SDXL UNet then fits in a few GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

GIB = 1024**3
CARDS_GB = (24, 48, 80)
# a "24 GB" NVIDIA card has 24 GiB (RTX 4090: 24564 MiB; H100 80GB: 81559 MiB); the CUDA context and the caching
# allocator's slack take some of it, so a peak must stay 1 GiB under the label to count as fitting
CARD_USABLE_GIB = {c: c - 1.0 for c in CARDS_GB}
ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================== the families
@dataclass(frozen=True)
class FamilySpec:
    """A family at full size: its ComfyUI config class, the unet config ComfyUI's detection returns for its files,
    what its text encoder hands the network, and how the activation runs reduce it."""

    name: str
    config_class: str
    unet_config: dict[str, Any]
    latent_channels: int
    cross: tuple[int, int]  # text tokens x width of the conditioning at the table's prompt length
    extras: dict[str, Any]  # pooled_output width (int) or constants, as CLIPTextEncode's conditioning carries them
    depth_keys: tuple[str, ...] = ()  # the unet config's block counts; empty: the whole network is measured
    patch: int = 2  # latent pixels per token side (DiTs)
    notes: str = ""

    @property
    def full_depths(self) -> tuple[int, ...]:
        return tuple(int(self.unet_config[k]) for k in self.depth_keys)


# model_detection.unet_config_from_diffusers_unet's SDXL entry (what detect_unet_config returns for an SDXL file)
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
# model_detection's Flux branch for flux1-dev (guidance_in present, vector_in 768 wide, 19 double + 38 single blocks)
FLUX_UNET = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
             "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
             "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
             "guidance_embed": True}
# model_detection's Qwen-Image branch: in_channels from img_in (64), 60 blocks; the rest are the class's defaults
# (24 heads x 128 = 3072 wide, joint_attention_dim 3584 = Qwen2.5-VL 7B's width)
QWEN_UNET = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (
    FamilySpec("SDXL", "SDXL", SDXL_UNET, 4, (77, 2048), {"pooled_output": 1280},
               notes="CLIP-L + CLIP-G, 77 tokens"),
    FamilySpec("Flux.1 dev", "Flux", FLUX_UNET, 16, (256, 4096), {"pooled_output": 768, "guidance": 3.5},
               ("depth", "depth_single_blocks"), notes="T5-XXL padded to 256 tokens (ComfyUI's min_length)"),
    FamilySpec("Qwen-Image", "QwenImage", QWEN_UNET, 16, (128, 3584), {}, ("num_layers",),
               notes="Qwen2.5-VL 7B; 128 prompt tokens assumed (no padding in ComfyUI)"),
)}
TABLE_PX = 1024


def table_tokens(spec: FamilySpec, px: int = TABLE_PX) -> float:
    """What activations scale with: image + text tokens for the DiTs, latent pixels for the UNet."""
    side = px // 8
    if spec.depth_keys:
        return (side // spec.patch) ** 2 + spec.cross[0]
    return float(side * side)


# ============================================================================================== ComfyUI
def comfy_setup(sdpa: bool = True) -> None:
    """Import ComfyUI from COMFYUI_PATH on the CPU; with `sdpa`, ComfyUI's attention is torch's SDPA, as on NVIDIA."""
    path = os.environ.get("COMFYUI_PATH", "")
    if not path or not (Path(path) / "comfy").is_dir():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True  # read when comfy.model_management is first imported
    args.use_pytorch_cross_attention = sdpa
    import comfy.model_management  # noqa: F401
    import comfy.supported_models  # noqa: F401


def base_model(spec: FamilySpec, overrides: dict[str, Any] | None = None, meta: bool = True) -> Any:
    """The family's model_base object, through its own supported_models class; network weights on meta with `meta`.

    The torch.device("meta") context reaches tensors ComfyUI's modules create without a device argument; the
    model_sampling schedule is then rebuilt on the CPU (ComfyDenoiser reads sigma_min / sigma_max from it)."""
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, spec.config_class)({**spec.unet_config, **(overrides or {})})
    cfg.set_inference_dtype(torch.float32, None)
    if not meta:
        return cfg.get_model({})
    with torch.device("meta"):
        model = cfg.get_model({}, device="meta")
    import comfy.model_base

    model.model_sampling = comfy.model_base.model_sampling(cfg, model.model_type)
    return model


def denoiser_of(base: Any) -> nn.Module:
    """The pack's training copy of a ComfyUI BaseModel: copy_base_model (what trainable_copy runs after
    loading: float32 copy, plain comfy.ops layers, and whatever backward needs, e.g. Flux's norm-input clones)."""
    from diffinstruct.comfyui import host
    from diffinstruct.comfyui.copies import copy_base_model

    kind = host.parameterisation(base)
    process = "flow" if kind in host.FLOW_PARAMETERISATIONS else "ve"
    return host.ComfyDenoiser(copy_base_model(base, torch.float32), process)


def conditioning(spec: FamilySpec, base: Any, side: int, text_tokens: int, seed: int) -> dict[str, Any]:
    """The engine's cond dict for one prompt (host.encode_conditioning over the family's extra_conds)."""
    from diffinstruct.comfyui import host

    gen = torch.Generator().manual_seed(seed)
    extras: dict[str, Any] = {}
    for key, value in spec.extras.items():
        extras[key] = torch.randn((1, value), generator=gen) if key == "pooled_output" else value
    cross = torch.randn((1, text_tokens, spec.cross[1]), generator=gen)
    patcher = SimpleNamespace(model=base, load_device=torch.device("cpu"))  # what encode_conditioning reads
    return host.encode_conditioning(patcher, [cross, extras], (side, side), 8)


# ============================================================================================== counting
def is_lora_target(module: nn.Module) -> bool:
    from diffinstruct.lora import default_target

    return default_target("", module)


@dataclass
class Counts:
    """Parameter counts of one network: `wrapped` are the Linear/Conv2d parameters LoRA wraps (and store_frozen_in
    turns to bf16, and autocast casts on every pass); `lora` is one role's adapter at `rank`."""

    total: int
    wrapped: int
    lora: int
    lora_layers: int
    rank: int

    @property
    def other(self) -> int:
        return self.total - self.wrapped


def count(spec: FamilySpec, rank: int) -> Counts:
    """Exact counts at full size on the meta device; LoRA's adapters counted by the package's attach_lora itself."""
    from diffinstruct.lora import LoRALayer, attach_lora

    net = base_model(spec).diffusion_model
    total = sum(p.numel() for p in net.parameters())
    wrapped = sum(p.numel() for m in net.modules() if is_lora_target(m) for p in m.parameters(recurse=False))
    with torch.device("meta"):  # adapters of a 20B network on the meta device too
        _, params = attach_lora(net, roles=("generator",), rank=rank)
    layers = sum(1 for m in net.modules() if isinstance(m, LoRALayer))
    return Counts(total, wrapped, sum(p.numel() for p in params["generator"]), layers, rank)


# ============================================================================================== bytes per parameter
@dataclass(frozen=True)
class ModeSpec:
    """One row kind of the table: how the engine holds a family's parameters in that mode (bytes per parameter)."""

    key: str
    label: str
    shared: bool
    activations: str  # which measured activation set applies: "bf16" (autocast) or "fp32"
    frozen_wrapped: float  # the frozen base's Linear/Conv2d weights (shared) / the reference's (full)
    frozen_other: float  # the rest of the frozen network (norms, embeddings, modulation scales...)
    per_trainable: float  # weights + gradient + Adam state (+ EMA for the generator), summed over TA and generator
    autocast_weight_copies: float = 0.0  # bf16 casts of trainable Linear/Conv weights autograd saves (full + bf16)
    derived: bool = False  # not a configuration the pack runs today: numbers derived, not measured
    note: str = ""


# Generator trainable: weight 4 + grad 4 + exp_avg_sq 4 + EMA 4 = 16; TA trainable: 12. Both float32: LoRA adapters
# are made in the dtype of the float32 copy they wrap; full-mode copies are float32 (trainable_copy's default).
MODES: tuple[ModeSpec, ...] = (
    ModeSpec("shared-fp32", "shared, fp32 base (bf16 off)", True, "fp32", 4, 4, 16 + 12),
    ModeSpec("shared-bf16", "shared, bf16 base (bf16 on)", True, "bf16", 2, 4, 16 + 12),
    ModeSpec("shared-fp8", "shared, fp8 base (derived)", True, "bf16", 1, 4, 16 + 12, derived=True,
             note="fp8 e4m3 storage of the wrapped weights, computed in bf16; activations as bf16"),
    ModeSpec("full-fp32", "full, fp32 (bf16 off)", False, "fp32", 4, 4, 16 + 12),
    ModeSpec("full-amp", "full, bf16 reference + bf16 autocast", False, "bf16", 2, 4, 16 + 12,
             autocast_weight_copies=2),
)


def ta_grad_bytes(mode: ModeSpec, c: Counts) -> float:
    """The TA's gradients (float32, like its trainable weights): they grow during the TA's backward while its
    activations are freed."""
    return 4.0 * (c.lora if mode.shared else c.total)


def peak_bytes(mode: ModeSpec, c: Counts, activations: float) -> float:
    """Peak of the iteration. The generator's gradients stay until its optimiser step, after the TA's backward
    ("reuse" plan); in the TA's backward the activations A shrink while the TA's gradients G grow, block by block,
    so the live sum peaks at max(A, G) there: everything else, plus max(A, G). The generator's own backward holds
    less (no TA gradients yet), and its forward's A already includes the no-grad passes run on top of it."""
    weights, state = state_bytes(mode, c)
    g = ta_grad_bytes(mode, c)
    return weights + state - g + max(activations, g)


def state_bytes(mode: ModeSpec, c: Counts) -> tuple[float, float]:
    """(weights, trainable state) in bytes: frozen weights; then trainable weights, grads, Adam, EMA."""
    if mode.shared:
        weights = mode.frozen_wrapped * c.wrapped + mode.frozen_other * c.other
        trainable = mode.per_trainable * c.lora  # each role's adapter is c.lora parameters
    else:
        weights = mode.frozen_wrapped * c.wrapped + mode.frozen_other * c.other  # the reference
        trainable = mode.per_trainable * c.total
    return weights, trainable


# ============================================================================================== step 2: confirm
TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
             "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
             "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
TINY = FamilySpec("tiny Flux", "Flux", TINY_FLUX, 16, (8, 64), {"pooled_output": 32, "guidance": 3.5})


def storages(tensors: Iterator[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Distinct storages (a tensor shared by several modules counts once)."""
    out: dict[int, torch.Tensor] = {}
    for t in tensors:
        out.setdefault(t.untyped_storage().data_ptr(), t)
    return out


def nbytes(tensors: Any) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def confirm_bytes(shared: bool, bf16: bool, rank: int) -> dict[str, Any]:
    """One DITrainer.train_step on a tiny Flux through ComfyUI; the bytes held afterwards, by what holds them, against
    the per-parameter costs of MODES."""
    from diffinstruct import engine
    from diffinstruct.lora import LoRALayer
    from diffinstruct.prompts import PromptList

    torch.manual_seed(0)
    base = base_model(TINY, meta=False)
    for p in base.diffusion_model.parameters():  # ComfyUI's layers skip init: give every weight a value
        nn.init.normal_(p, std=0.02)
    teacher = denoiser_of(base)
    latent = (TINY.latent_channels, 8, 8)
    models = engine.assemble(teacher, latent, mode="shared" if shared else "full", rank=rank, seed=0)
    table = {p: conditioning(TINY, base, 8, TINY.cross[0], i) for i, p in enumerate(("a", "b", ""))}
    prompts = PromptList(["a", "b"], encode=lambda p: table[p], null="")
    trainer = engine.build_engine(models, prompts, {"batch_size": 1, "omega": 4.5, "bf16": bf16})
    seen: dict[str, int] = {}
    apply = trainer._apply_generator

    def spy(ok: bool) -> None:  # called after the TA's backward: both networks' gradients are alive here
        seen["grads"] = nbytes(p.grad for p in trainer.generator_params + trainer.ta_params if p.grad is not None)
        apply(ok)

    trainer._apply_generator = spy  # type: ignore[method-assign]
    trainer.train_step(0)
    nets = [models.generator, models.ta, models.reference]
    params = storages(p for n in nets for p in n.parameters())
    frozen = [t for t in params.values() if not t.requires_grad]
    trainable = [t for t in params.values() if t.requires_grad]
    opt = [t for o in (trainer.opt_generator, trainer.opt_ta) for s in o.state.values() for t in s.values()]
    steps = sum(t.numel() == 1 and t.dim() == 0 for t in opt)  # Adam's per-tensor step counters, 4 B each
    net = base.diffusion_model
    total = sum(p.numel() for p in net.parameters())
    wrapped = sum(p.numel() for m in net.modules() if is_lora_target(m) for p in m.parameters(recurse=False))
    lora = sum(p.numel() for p in models.generator_params) if shared else 0
    c = Counts(total, wrapped, lora, sum(1 for m in teacher.modules() if isinstance(m, LoRALayer)), rank)
    mode = next(m for m in MODES if m.shared == shared and not m.derived and (m.activations == "bf16") == bf16)
    weights, state = state_bytes(mode, c)
    measured_state = nbytes(trainable) + nbytes(opt) - 4 * steps + nbytes(trainer.ema.shadow) + seen["grads"]
    return {"shared": shared, "bf16": bf16, "mode": mode.key, "params": total, "wrapped": wrapped, "lora": lora,
            "frozen_bytes": nbytes(frozen), "predicted_frozen": weights,
            "state_bytes": measured_state, "predicted_state": state,
            "trainable_bytes": nbytes(trainable), "optimizer_bytes": nbytes(opt) - 4 * steps,
            "ema_bytes": nbytes(trainer.ema.shadow), "grad_bytes": seen["grads"], "adam_step_tensors": steps}


# ============================================================================================== step 3: activations
def tie_frozen(module: nn.Module, seed: int = 0) -> int:
    """Every frozen parameter and buffer that is on meta (or `frozen` and tied before) becomes one shared random
    tensor per (shape, dtype): values do not change memory, and the runs then hold one block's worth of weights.
    Returns the bytes the tied tensors take."""
    gen = torch.Generator().manual_seed(seed)
    pool: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def shared(t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.dtype)
        if key not in pool:
            pool[key] = (torch.randn(key[0], generator=gen) * 0.02).to(key[1])
        return pool[key]

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and (p.is_meta or not p.requires_grad):
                m._parameters[name] = nn.Parameter(shared(p), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = shared(b)
    return sum(t.nbytes for t in pool.values())


def materialize(module: nn.Module, seed: int = 0) -> None:
    """Meta parameters and buffers become real, each its own tensor (trainable full-mode networks: gradients and
    autocast's weight casts are per parameter, so sharing would hide them)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.randn(p.shape, generator=gen) * 0.02,
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.randn(b.shape, generator=gen) * 0.02


def drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got["VmRSS"], got["VmHWM"]


def reset_hwm() -> None:
    """Linux: writing 5 to clear_refs resets the RSS high-water mark, so VmHWM afterwards is this region's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def profiled_peak(region: Callable[[], None]) -> dict[str, float]:
    """Peak bytes torch's CPU allocator hands out during `region` above what was allocated before, from the
    profiler's memory timeline; with and without parameter gradients (accounted apart, as trainable state)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

    gc.collect()
    reset_hwm()
    rss0, _ = rss()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        region()
    seconds = time.perf_counter() - start
    _, hwm = rss()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    grad = _CATEGORY_TO_INDEX[Category.GRADIENT] + 1
    totals = [sum(s) for s in sizes]
    no_grads = [sum(s) - s[grad] for s in sizes]
    return {"peak": max(no_grads) - no_grads[0], "peak_with_grads": max(totals) - totals[0],
            "rss_peak": hwm - rss0, "seconds": seconds}


def activation_point(job: dict[str, Any]) -> dict[str, Any]:
    """One generator forward (grad, batch 1), the TA's and the reference's no-grad passes (batch 1, and cond+uncond
    as one batch of 2), the generator's backward: the peak extra memory, in a fresh process."""
    from diffinstruct import engine
    from diffinstruct.generator import OneStepGenerator
    from diffinstruct.lora import store_frozen_in
    from diffinstruct.prompts import join_conditioning
    from diffinstruct.trainer import VEView

    torch.manual_seed(0)
    spec = FAMILIES[job["family"]]
    overrides = dict(zip(spec.depth_keys, job["depths"], strict=True))
    side, bf16, shared = int(job["side"]), job["precision"] == "bf16", job["mode"] == "shared"
    base = base_model(spec, overrides)
    teacher = denoiser_of(base)
    latent = (spec.latent_channels, side, side)
    if shared:
        models = engine.assemble(teacher, latent, mode="shared", rank=int(job["rank"]), seed=0)
        if bf16:  # what DITrainer does with bf16 on; on the still-meta base it costs nothing
            store_frozen_in(teacher, torch.bfloat16)
        tie_frozen(teacher)  # the base (meta until now) tied by shape; the adapters are real already
        generator, ta, reference = models.generator, VEView(models.ta), VEView(models.reference)
    else:
        materialize(teacher)
        teacher.requires_grad_(True)
        for p in teacher.parameters():
            # gradients are trainable state, counted per parameter (MODES): drop each as it lands, so the peak is
            # the activations (and autocast's saved weight casts) alone, plus one parameter's gradient at most
            p.register_post_accumulate_grad_hook(drop_grad)
        generator = OneStepGenerator(teacher)
        ta = reference = VEView(teacher)  # no-grad passes: same shapes as the real TA and reference copies
    held = sum(t.untyped_storage().nbytes() for t in storages(p for p in teacher.parameters()).values())
    cond = conditioning(spec, base, side, spec.cross[0], 1)
    uncond = conditioning(spec, base, side, spec.cross[0], 2)
    both = join_conditioning(cond, uncond)
    z = torch.randn((1, *latent))
    sigma = torch.full((1,), 0.5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def region() -> None:
        with autocast:
            x0 = generator(z, cond)
        xt = x0.detach().float() + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0, dtype=torch.float32)
        # the trainer freezes the TA for the generator step and the reference is frozen: done here as well, since
        # autocast caches (and keeps until the context ends) its casts of any leaf that requires grad, no_grad or not
        trainable = [p for p in teacher.parameters() if p.requires_grad and not shared]
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), autocast:
            ta(xt, sigma, cond)
            reference(torch.cat([xt, xt]), torch.cat([sigma, sigma]), both)
        for p in trainable:
            p.requires_grad_(True)
        x0.backward(torch.randn_like(x0))

    out = profiled_peak(region)
    tokens = (side // spec.patch) ** 2 + spec.cross[0] if spec.depth_keys else side * side
    return {**job, **out, "tokens": tokens, "weights_held": held}


# ============================================================================================== orchestration
CACHE: list[dict[str, Any]] = []  # measurements of an earlier run (--reuse): a job found here is not run again


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """`job` in a fresh interpreter (its peak alone, nothing left from the previous point)."""
    for done_before in CACHE:
        if all(done_before.get(k) == v for k, v in job.items()):
            return done_before
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python_shim"),
                                                                      os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True,
                          text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child {job} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")


def child_main(job: dict[str, Any]) -> None:
    # one thread unless told otherwise: on a shared machine OpenMP's spinning threads slow a run tenfold, and the
    # memory measured does not depend on the thread count
    torch.set_num_threads(int(job.get("threads", 1)))
    comfy_setup(sdpa=True)
    if job["kind"] == "count":
        c = count(FAMILIES[job["family"]], int(job["rank"]))
        out: dict[str, Any] = {"total": c.total, "wrapped": c.wrapped, "lora": c.lora, "lora_layers": c.lora_layers}
    elif job["kind"] == "confirm":
        out = confirm_bytes(job["shared"], job["bf16"], int(job["rank"]))
    else:
        out = activation_point(job)
    print(json.dumps(out))


@dataclass
class Plan:
    """Which activation points to measure per family: depth variants x latent sides x precisions."""

    depths: list[tuple[int, ...]]
    sides: list[int]  # bf16: every depth variant at each side, fitted linear in tokens
    fp32_side: int  # fp32: every depth variant at this side; the bf16 fit is scaled part by part by the ratio
    check_side: int | None = None  # a larger side at the first depth variant (bf16), to test linearity


PLANS: dict[str, Plan] = {
    # Flux: (1, 1) holds the embedders, the final layer and the transients; (2, 1) - (1, 1) is one double block,
    # (1, 2) - (1, 1) one single block. Sides 32 / 64: 256 / 1024 image tokens (+ 256 text)
    "Flux.1 dev": Plan([(1, 1), (2, 1), (1, 2)], [32, 64], 32, 96),
    "Qwen-Image": Plan([(1,), (2,)], [32, 64], 32),
    "SDXL": Plan([()], [32, 64], 32),
}


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through `points`."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


@dataclass
class Activations:
    """Fitted activation model of one family and precision: peak bytes = fixed(T) + sum over blocks of held(T)."""

    fixed: tuple[float, float]  # (intercept, slope in bytes per token) of the depth-1 network's peak minus blocks
    blocks: list[tuple[float, float]]  # per block kind: (intercept, bytes per token) held for backward
    check: tuple[float, float, float] | None = None  # (tokens, measured, predicted) at the linearity check side

    def at(self, tokens: float, depths: tuple[int, ...]) -> float:
        total = self.fixed[0] + self.fixed[1] * tokens
        for (a, b), n in zip(self.blocks, depths, strict=True):
            total += n * (a + b * tokens)
        return total


def fit_activations(plan: Plan, points: list[dict[str, Any]], precision: str) -> Activations:
    """bf16: parts fitted over plan.sides. fp32: the bf16 fit, each part scaled by its fp32 / bf16 ratio measured at
    plan.fp32_side (fp32 runs are 5x slower on the CPU; the ratio is what dtype changes)."""
    def parts_at(pr: str, side: int) -> tuple[float, list[float]]:
        """(tokens, [rest, held per block kind...]) at one side."""
        def peak(depths: tuple[int, ...]) -> dict[str, Any]:
            return next(p for p in points if p["precision"] == pr and p["mode"] == "shared"
                        and tuple(p["depths"]) == depths and p["side"] == side)

        first = peak(plan.depths[0])
        held = [peak(d)["peak"] - first["peak"] for d in plan.depths[1:]]
        return first["tokens"], [first["peak"] - sum(held), *held]

    at_sides = [parts_at("bf16", s) for s in plan.sides]
    fitted = [linear_fit([(t, parts[i]) for t, parts in at_sides]) for i in range(len(plan.depths))]
    if precision == "fp32":
        _, bf = parts_at("bf16", plan.fp32_side)
        _, fp = parts_at("fp32", plan.fp32_side)
        fitted = [(a * f / b, s * f / b) for (a, s), f, b in zip(fitted, fp, bf, strict=True)]
    act = Activations(fitted[0], fitted[1:])
    checks = [p for p in points if p["precision"] == "bf16" and p["mode"] == "shared" and p["side"] == plan.check_side
              and tuple(p["depths"]) == plan.depths[0]]
    if precision == "bf16" and checks:
        act.check = (checks[0]["tokens"], checks[0]["peak"], act.at(checks[0]["tokens"], plan.depths[0]))
    return act


def fits(total: float) -> str:
    return " / ".join("yes" if total / GIB <= CARD_USABLE_GIB[c] else "no" for c in CARDS_GB)


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of shared mode (the nodes' default: 8)")
    parser.add_argument("--quick", action="store_true", help="bf16 activations only (fp32 rows then derived x2)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--reuse", type=Path, help="take the measurements a --json file of an earlier run holds")
    opts = parser.parse_args()
    if opts.child:
        child_main(json.loads(opts.child))
        return
    if opts.reuse:
        old = json.loads(opts.reuse.read_text())
        CACHE.extend(old["points"])
        CACHE.extend({"kind": "count", "family": k, "rank": v["rank"], **v} for k, v in old["counts"].items())
        CACHE.extend({"kind": "confirm", "rank": opts.rank, **c} for c in old["confirm"])
    started = time.perf_counter()
    log = sys.stderr
    counts: dict[str, Counts] = {}
    for name in FAMILIES:
        got = run_child({"kind": "count", "family": name, "rank": opts.rank})
        counts[name] = Counts(got["total"], got["wrapped"], got["lora"], got["lora_layers"], opts.rank)
        print(f"# {name}: {got}", file=log, flush=True)
    confirms = [run_child({"kind": "confirm", "shared": s, "bf16": b, "rank": opts.rank})
                for s in (True, False) for b in (False, True)]
    for c in confirms:
        print(f"# confirm {c}", file=log, flush=True)
    precisions = ["bf16"] if opts.quick else ["bf16", "fp32"]
    points: list[dict[str, Any]] = []
    for name, plan in PLANS.items():
        jobs = [{"kind": "act", "family": name, "depths": list(d), "side": s, "precision": "bf16", "mode": "shared",
                 "rank": opts.rank} for d in plan.depths for s in plan.sides]
        if "fp32" in precisions:
            jobs += [{"kind": "act", "family": name, "depths": list(d), "side": plan.fp32_side, "precision": "fp32",
                      "mode": "shared", "rank": opts.rank} for d in plan.depths]
        if plan.check_side:
            jobs.append({"kind": "act", "family": name, "depths": list(plan.depths[0]), "side": plan.check_side,
                         "precision": "bf16", "mode": "shared", "rank": opts.rank})
        if name == "Flux.1 dev":  # full mode's activations against shared mode's, on one small point
            jobs += [{"kind": "act", "family": name, "depths": [1, 1], "side": 32, "precision": pr, "mode": "full",
                      "rank": opts.rank} for pr in precisions]
        for job in jobs:
            p = run_child(job)
            points.append(p)
            if opts.json:  # after every point, so that --reuse picks up an interrupted run
                opts.json.write_text(json.dumps({"counts": {k: vars(v) for k, v in counts.items()},
                                                 "confirm": confirms, "points": points}, indent=1))
            print(f"# {name} {p['precision']} {p['mode']} depths {p['depths']} side {p['side']} tokens {p['tokens']}:"
                  f" peak {p['peak'] / 2**20:.0f} MiB (with grads {p['peak_with_grads'] / 2**20:.0f}, RSS "
                  f"{p['rss_peak'] / 2**20:.0f}) in {p['seconds']:.1f} s", file=log, flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"counts": {k: vars(v) for k, v in counts.items()}, "confirm": confirms,
                                         "points": points}, indent=1))
    print(report(counts, confirms, points, precisions, opts.rank, time.perf_counter() - started))


def full_mode_extra(points: list[dict[str, Any]], precision: str) -> float | None:
    """Measured full-mode minus shared-mode peak on the same Flux point (bytes), when both ran."""
    def one(mode: str) -> dict[str, Any] | None:
        return next((p for p in points if p["mode"] == mode and p["precision"] == precision
                     and p["family"] == "Flux.1 dev" and p["depths"] == [1, 1] and p["side"] == 32), None)

    full, shared = one("full"), one("shared")
    return None if full is None or shared is None else full["peak"] - shared["peak"]


def report(counts: dict[str, Counts], confirms: list[dict[str, Any]], points: list[dict[str, Any]],
           precisions: list[str], rank: int, seconds: float) -> str:
    lines = [f"Parameters (ComfyUI classes on the meta device), LoRA rank {rank} on every Linear/Conv2d:", "",
             "| family | parameters | in Linear/Conv2d | LoRA per role | LoRA layers |", "|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c.total:,} | {c.wrapped:,} | {c.lora:,} | {c.lora_layers} |")
    lines += ["", "Bytes held after one train_step on a tiny Flux (measured / predicted from MODES):", "",
              "| mode | frozen weights | trainable + grads + Adam + EMA | of which grads (both nets at once) |",
              "|---|---|---|---|"]
    for c in confirms:
        lines.append(f"| {c['mode']} | {c['frozen_bytes']:,} / {c['predicted_frozen']:,.0f} | "
                     f"{c['state_bytes']:,} / {c['predicted_state']:,.0f} | {c['grad_bytes']:,} |")
    acts: dict[tuple[str, str], Activations] = {}
    lines += ["", "Activations, measured (torch CPU allocator peak; SDPA attention), fitted a + b x tokens:", "",
              "| family | precision | part | intercept MiB | bytes per token | linearity check |",
              "|---|---|---|---|---|---|"]
    for name, plan in PLANS.items():
        spec = FAMILIES[name]
        for pr in precisions:
            act = fit_activations(plan, points, pr)
            acts[(name, pr)] = act
            parts = [("rest (embedders, final, transients)", act.fixed)]
            parts += [(f"per {kind} block (held)", ab) for kind, ab in zip(block_kinds(spec), act.blocks, strict=True)]
            for i, (part, (a, b)) in enumerate(parts):
                check = ""
                if i == 0 and act.check:
                    t, meas, pred = act.check
                    check = f"{t:.0f} tokens: {meas / 2**20:.0f} MiB measured, {pred / 2**20:.0f} predicted"
                unit = "latent px" if not spec.depth_keys else "token"
                lines.append(f"| {name} | {pr} | {part} | {a / 2**20:.0f} | {b:,.0f} per {unit} | {check} |")
    for pr in precisions:
        extra = full_mode_extra(points, pr)
        if extra is not None:
            lines.append(f"\nFull mode minus shared mode, Flux depth (1, 1) at 512 tokens, {pr}: "
                         f"{extra / 2**20:.0f} MiB")
    lines += ["", f"Peak of one DI++ iteration, batch 1, {TABLE_PX}x{TABLE_PX} px, GiB (reward model, text encoders, "
              "VAE and the host's own copy of the model not counted); fits = peak <= card - 1 GiB:", "",
              "| family | mode | weights | trainable state | activations | total | fits 24 / 48 / 80 GB |",
              "|---|---|---|---|---|---|---|"]
    for name, spec in FAMILIES.items():
        c = counts[name]
        tokens = table_tokens(spec)
        for mode in MODES:
            pr = mode.activations if mode.activations in precisions else "bf16"
            act = acts[(name, pr)].at(tokens, spec.full_depths)
            if pr != mode.activations:
                act *= 2  # --quick: fp32 activations taken as twice bf16's
            act += mode.autocast_weight_copies * c.wrapped
            weights, state = state_bytes(mode, c)
            total = peak_bytes(mode, c, act)
            label = mode.label + (" *" if pr != mode.activations else "")
            lines.append(f"| {name} | {label} | {gib(weights)} | {gib(state)} | {gib(act)} | {gib(total)} | "
                         f"{fits(total)} |")
    lines += ["", f"(script wall time {seconds / 60:.1f} min)"]
    return "\n".join(lines)


def block_kinds(spec: FamilySpec) -> list[str]:
    return {"Flux.1 dev": ["double-stream", "single-stream"], "Qwen-Image": ["transformer"]}.get(spec.name, [])


if __name__ == "__main__":
    main()
