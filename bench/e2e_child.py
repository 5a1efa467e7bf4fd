"""One implementation of one configuration in its own process, for bench/e2e.py.

The parent starts one such process per (implementation, configuration) and drives them in turn over stdin/stdout
(`step`, `profile`, `quit`), so the timings of ours and the peer loop interleave while each process's peak RSS
(VmHWM) is its own. Implementations: "ours" (engine.assemble + engine.build_engine, DITrainer.train_step), "peer"
(bench/peer_loop.py), and ours with engine options (ENGINE_OPTIONS: DIConfig overrides such as the onepass plan)
or with a prototype of an engine change applied here by monkeypatching (PROTOTYPES), so that its effect is measured
without touching the engine's files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from memory import SD15_UNET, status_bytes  # noqa: E402
from peer_loop import PeerLoop  # noqa: E402

# SD1.5's UNet cut down to CPU size: the same block types, four levels, one layer per block
E2E_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 32, "block_out_channels": [64, 128, 256, 256],
                            "layers_per_block": 1, "cross_attention_dim": 64}
TINY_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 8, "block_out_channels": [32, 32], "layers_per_block": 1,
                             "norm_num_groups": 8, "cross_attention_dim": 16, "attention_head_dim": 2,
                             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TOKENS = 77
PROMPTS = 4
OMEGA = 4.5
RANK = 8
FINITE = ("ta_loss", "generator_grad_norm", "generator_loss")
BASELINE = [0]  # the child's RSS after its imports


@dataclass
class Spec:
    impl: str  # "ours", "peer", or "ours+<option or prototype>[+...]"
    mode: str = "shared"
    bf16: bool = False
    batch: int = 2
    latent: int = 32
    tiny: bool = False
    seed: int = 0

    def unet_config(self) -> dict[str, Any]:
        return {**(TINY_UNET if self.tiny else E2E_UNET), "sample_size": self.latent}


def build_unet(spec: Spec) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(spec.seed)
    return UNet2DConditionModel.from_config(spec.unet_config()).eval()


def text_table(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS random prompt embeddings [P, 77, D] and the null prompt's [1, 77, D], the same in every process."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    dim = spec.unet_config()["cross_attention_dim"]
    return torch.randn(PROMPTS, TOKENS, dim, generator=g), torch.randn(1, TOKENS, dim, generator=g)


def sd15_sigmas() -> torch.Tensor:
    """The SD1.5 (scaled_linear) sigma table from diffusers' scheduler, as a peer would get it."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a = sched.alphas_cumprod
    return ((1 - a) / a).sqrt().float()


def build_ours(spec: Spec, unet: nn.Module | None = None, **options: Any) -> Any:
    from diffinstruct import engine
    from diffinstruct.config import DIConfig
    from diffinstruct.hosts import diffusers as H
    from diffinstruct.prompts import PromptList

    unet = build_unet(spec) if unet is None else unet
    models = engine.assemble(H.unet_denoiser(unet), (4, spec.latent, spec.latent), mode=spec.mode, rank=RANK,
                             target=H.attention_and_conv_target, seed=spec.seed)
    prompts, null = text_table(spec)
    table = {f"prompt {i}": prompts[i:i + 1] for i in range(PROMPTS)} | {"": null}
    plist = PromptList([f"prompt {i}" for i in range(PROMPTS)], encode=table.__getitem__)
    cfg = DIConfig(batch_size=spec.batch, omega=OMEGA, alpha=0.0, bf16=spec.bf16, seed=spec.seed, **options)
    return engine.build_engine(models, plist, cfg)


def build_peer(spec: Spec, unet: nn.Module | None = None) -> PeerLoop:
    prompts, null = text_table(spec)
    return PeerLoop(build_unet(spec) if unet is None else unet, sd15_sigmas(), prompts, null, mode=spec.mode,
                    rank=RANK, batch=spec.batch, latent=(4, spec.latent, spec.latent), omega=OMEGA, bf16=spec.bf16,
                    seed=spec.seed)


# ---------------------------------------------------------------------------------------------- prototypes
# An engine change under evaluation is applied here by monkeypatching, so that its effect is measured before it is
# built into the engine: name -> function(trainer). None at present (bf16 frozen weights in full mode, the last one,
# is now the engine's own behaviour: lora.store_frozen_in).
PROTOTYPES: dict[str, Callable[[Any], None]] = {}
ENGINE_OPTIONS: dict[str, dict[str, Any]] = {"onepass": {"ta_sample": "onepass"}}
VARIANT_TEXT = {
    "onepass": "the engine's `ta_sample = \"onepass\"` pass plan: the TA's update reuses the generator step's x_t "
               "(its sigma and eps), so one TA forward with grad serves both halves: 3 network passes an iteration "
               "instead of 4",
}


def build(spec: Spec) -> Callable[[int], dict[str, float]]:
    """The implementation's one-iteration callable."""
    if spec.impl == "peer":
        loop = build_peer(spec)
        return lambda step: loop.step()
    name, *parts = spec.impl.split("+")
    if name != "ours" or any(p not in PROTOTYPES and p not in ENGINE_OPTIONS for p in parts):
        raise ValueError(f"unknown implementation {spec.impl!r}")
    options = {k: v for p in parts if p in ENGINE_OPTIONS for k, v in ENGINE_OPTIONS[p].items()}
    trainer = build_ours(spec, **options)
    for p in parts:
        if p in PROTOTYPES:
            PROTOTYPES[p](trainer)
    return trainer.train_step


# ---------------------------------------------------------------------------------------------- profile
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("conv", ("convolution", "conv2d", "mkldnn_conv")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("norm", ("group_norm", "layer_norm")),
    ("casts/copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("elementwise", ("aten::",)),
)


def categorise(name: str) -> str | None:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return None


def profile(step_fn: Callable[[int], dict[str, float]], step: int) -> dict[str, Any]:
    """One step under torch.profiler: aten self-CPU seconds per category and the calls of the cast ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        step_fn(step)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds: dict[str, float] = {}
    casts = 0
    for ev in prof.key_averages():
        label = categorise(ev.key)
        if label is None:
            continue
        seconds[label] = seconds.get(label, 0.0) + ev.self_cpu_time_total / 1e6
        if ev.key in ("aten::_to_copy",):
            casts += ev.count
    seconds["outside aten (Python, our C kernels)"] = max(0.0, wall - sum(seconds.values()))
    return {"wall": wall, "cpu": cpu, "seconds": seconds, "to_copy_calls": casts,
            "peak_mib": (status_bytes("VmHWM") - BASELINE[0]) / 2**20}


# ---------------------------------------------------------------------------------------------- the child
def serve(spec: Spec) -> None:
    if sys.platform.startswith("linux"):  # end with the parent, also when it is killed
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    torch.set_num_threads(1)
    import diffusers  # noqa: F401 - imported before the baseline in every process alike

    import diffinstruct.trainer  # noqa: F401

    out = sys.stdout
    baseline = BASELINE[0] = status_bytes("VmRSS")
    t0 = time.perf_counter()
    step_fn = build(spec)
    built = status_bytes("VmRSS")

    def send(tag: str, record: dict[str, Any]) -> None:
        out.write(f"{tag} {json.dumps(record)}\n")
        out.flush()

    send("READY", {"build_s": time.perf_counter() - t0, "built_mib": (built - baseline) / 2**20,
                   "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")})
    step = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "step":
            t, c = time.perf_counter(), time.process_time()
            metrics = step_fn(step)
            seconds, cpu = time.perf_counter() - t, time.process_time() - c
            finite = all(math.isfinite(metrics[k]) for k in FINITE if k in metrics)
            send("STEP", {"seconds": seconds, "cpu": cpu, "finite": finite,
                          "peak_mib": (status_bytes("VmHWM") - baseline) / 2**20})
        elif cmd[0] == "profile":
            send("PROFILE", profile(step_fn, step))
        step += 1


if __name__ == "__main__":
    serve(Spec(**json.loads(sys.argv[1])))
