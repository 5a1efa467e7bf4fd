"""The measuring half of `make gpu-check` (bench/gpu_check.py runs it as a child process).

Usage: python bench/gpu_check_timing.py --device cuda|cpu --out RESULT.json [--quick] [--budget-s S]

1. Copy bandwidth: a device-to-device copy of a large tensor (read + write counted), the yardstick.
2. Every fused kernel (the cases of bench/bench_cases.py: their names and byte models), validated once
   against the PyTorch reference backend on the device, then timed; achieved GB/s under the byte model
   and its fraction of the copy bandwidth.
3. DI++ iterations (DITrainer.train_step through engine.assemble / build_engine) of a UNet2DConditionModel
   with random weights (SD1.5's config from bench/memory.py; nothing downloaded), bf16 weights, shared (LoRA)
   and full mode: seconds per iteration and peak torch.cuda.max_memory_allocated. A row that fails (out of
   memory included) records its error and the next row runs.

With --device cpu the same code runs at smoke sizes on a tiny UNet: it exercises the path, it measures
nothing worth reporting. The result file is rewritten after every case and row, so a crash or a timeout
still leaves what was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cases as cases  # noqa: E402
import memory  # noqa: E402

from diffinstruct import kernels as K  # noqa: E402

GIB = 1024**3
# per device: (label, shape) of the kernel sizes; the large one's tensors (64 MiB in float32) exceed any L2
KERNEL_SIZES = {"cuda": [("SD1.5 8x4x64x64", (8, 4, 64, 64)), ("large 64x4x256x256", (64, 4, 256, 256))],
                "cpu": [("smoke 2x4x16x16", (2, 4, 16, 16))]}
KERNEL_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
COPY_BYTES = {"cuda": 2 * GIB, "cpu": 16 * 1024**2}
# a UNet of SD1.5's family small enough for a CPU smoke of the iteration code
TINY_UNET: dict[str, Any] = {
    **memory.SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
}
UNETS = {"cuda": {"label": "SD1.5 UNet (UNet2DConditionModel, SD1.5 config, random weights)",
                  "config": memory.SD15_UNET, "latent": 64, "text": (77, 768), "batches": (1, 4, 8)},
         "cpu": {"label": "tiny UNet (block_out_channels 32, 64; CPU smoke)", "config": TINY_UNET, "latent": 8,
                 "text": (8, 32), "batches": (1, 2)}}
MODES = ("shared", "full")
LORA_RANK = 16


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], reps: int, device: torch.device) -> list[float]:
    """Seconds per call: CUDA events around each call on the current stream, perf_counter on the CPU."""
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def measure(fn: Callable[[], object], device: torch.device, target_s: float, min_reps: int = 5,
            max_reps: int = 200) -> dict[str, float]:
    """Median and minimum seconds per call after warm-up, with about target_s of timed calls."""
    for _ in range(3):
        fn()
    sync(device)
    estimate = min(time_calls(fn, 3, device))
    reps = max(min_reps, min(max_reps, int(target_s / max(estimate, 1e-7))))
    samples = time_calls(fn, reps, device)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "reps": reps}


def copy_bandwidth(device: torch.device, nbytes: int, target_s: float) -> dict[str, Any]:
    """GB/s of dst.copy_(src) on the device, counting the read and the write (2 x nbytes per call)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, target_s, min_reps=10, max_reps=100)
    result = {"bytes": nbytes, "gbs": 2 * nbytes / timing["median_s"] / 1e9,
              "best_gbs": 2 * nbytes / timing["min_s"] / 1e9, **timing}
    return result


# ---------------------------------------------------------------------------------------------- kernel cases


def _randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def _sigma(batch: int, gen: torch.Generator, device: torch.device, low: float) -> torch.Tensor:
    return torch.rand(batch, generator=gen, device=device) * 2 + low


def device_case(kernel: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> tuple[Callable[[dict[str, Any]], object], dict[str, Any]]:
    """(run, buffers) of one bench_cases kernel on `device`: the call bench_cases times, on device tensors."""
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they are used: large sizes stay quick
    n, batch = math.prod(shape), shape[0]

    def rnd(*names: str) -> dict[str, torch.Tensor]:
        return {k: _randn(shape, dtype, gen, device) for k in names}

    def empty(*names: str) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, dtype=dtype, device=device) for k in names}

    if kernel == "fill_normal":
        return (lambda d: K.fill_normal(d["out"], 1234, 0)), empty("out")
    if kernel.startswith("add_noise"):
        eps = "+eps" in kernel
        return (lambda d: K.add_noise(d["x0"], d["sigma"], 7, 0, out=d["xt"], return_eps=eps)), \
            {**rnd("x0"), **empty("xt"), "sigma": _sigma(batch, gen, device, 0.5)}
    if kernel == "cfg_combine":
        return (lambda d: K.cfg_combine(d["u"], d["c"], cases.OMEGA, out=d["out"])), {**rnd("u", "c"), **empty("out")}
    if kernel.startswith("ta_loss"):
        return (lambda d: K.ta_loss(d["ta"], d["x0"], d["sigma"], weighting="edm", need_grad=True)), \
            {**rnd("ta", "x0"), "sigma": _sigma(batch, gen, device, 0.1)}
    if kernel.startswith("generator_grad"):
        with_dr = "+dr" in kernel
        bufs = {**rnd("x0", "ta", "cond", "uncond", *(("dr",) if with_dr else ())), **empty("G")}
        alpha = cases.ALPHA if with_dr else 0.0
        return (lambda d: K.generator_grad(d["x0"], d["ta"], d["cond"], d_uncond=d["uncond"], omega=cases.OMEGA,
                                           dr=d.get("dr"), alpha=alpha, weighting="normalized", out=d["G"])), bufs
    if kernel == "huber_terms":
        c_h = 0.03 * math.sqrt(n // batch)
        return (lambda d: K.huber_terms(d["x0"], d["dp"], d["dq"], d["sigma"], c_h, weighting="sigma2")), \
            {**rnd("x0", "dp", "dq"), "sigma": _sigma(batch, gen, device, 0.5)}
    sizes = cases._split(n)
    if kernel.startswith("ema_update"):
        def ema(d: dict[str, Any]) -> object:
            K.ema_update(d["ema"], d["p"], cases.DECAY)
            return d["ema"]
        return ema, {k: [_randn((m,), dtype, gen, device) for m in sizes] for k in ("ema", "p")}
    if kernel.startswith("adam_step"):
        def adam(d: dict[str, Any]) -> object:
            K.adam_step(d["p"], d["g"], d["m"], d["v"], **cases.ADAM)
            return d["p"], d["m"], d["v"]
        return adam, {"p": [_randn((m,), dtype, gen, device) for m in sizes],
                      "g": [_randn((m,), dtype, gen, device) for m in sizes],
                      "m": [torch.zeros(m, device=device) for m in sizes],
                      "v": [torch.rand(m, generator=gen, device=device) for m in sizes]}
    raise KeyError(f"no device case for {kernel!r}")


def byte_models() -> list[tuple[str, str, float, float]]:
    """(kernel, byte model, bytes per element at 4-byte and at 2-byte dtypes) of every bench_cases case, read
    off a tiny CPU instance (each model is linear in the element count n)."""
    shape, n = (2, 4, 8, 8), 2 * 4 * 8 * 8
    out = []
    for builder, kwargs, _target in cases.BUILDERS:
        c32 = builder(shape, torch.float32, 1, **kwargs)
        c16 = builder(shape, torch.bfloat16, 1, **kwargs)
        out.append((c32.kernel, c32.model, c32.nbytes / n, c16.nbytes / n))
    return out


def kernel_rows(device: torch.device, copy_gbs: float, target_s: float, deadline: float,
                emit: Callable[[dict[str, Any]], None]) -> None:
    """Validates then times every case at every size and dtype of the device; one row each through emit."""
    backend = "cuda" if device.type == "cuda" else "cpu"
    models = byte_models()
    for label, shape in KERNEL_SIZES[device.type]:
        for dname, dtype in KERNEL_DTYPES.items():
            for kernel, model, per32, per16 in models:
                row: dict[str, Any] = {"size": label, "dtype": dname, "kernel": kernel, "model": model}
                if time.monotonic() > deadline:
                    emit({**row, "error": "not run: over the time budget"})
                    continue
                nbytes = (per32 if dtype.itemsize == 4 else per16) * math.prod(shape)
                try:
                    with K.use_backend(backend):
                        run, bufs = device_case(kernel, shape, dtype, device)
                        cases.against_reference(kernel, run, bufs)
                        timing = measure(lambda run=run, bufs=bufs: run(bufs), device, target_s)
                    gbs = nbytes / timing["median_s"] / 1e9
                    row.update(timing, nbytes=nbytes, gbs=gbs, of_copy=gbs / copy_gbs, checked=True)
                except Exception as exc:  # a failing case is reported and the next one runs
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                emit(row)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- DI++ iterations


def _train_row(spec: dict[str, Any], mode: str, batch: int, device: torch.device, warmup: int,
               iters: int) -> dict[str, Any]:
    """Builds one engine (bf16 weights on the device) and times its iterations; raises on failure."""
    from diffinstruct import engine
    from diffinstruct.config import DIConfig
    from diffinstruct.hosts import diffusers as H
    from diffinstruct.prompts import PromptList
    from diffinstruct.rewards import TargetReward

    t0 = time.perf_counter()
    with torch.device(device):  # random init on the device: seconds instead of a minute of CPU init at SD1.5 size
        unet = H.build_model("unet", spec["config"], dtype=torch.bfloat16, seed=0)
    params = sum(p.numel() for p in unet.parameters())  # before shared mode adds its adapters
    latent = (4, spec["latent"], spec["latent"])
    models = engine.assemble(H.unet_denoiser(unet), latent, mode=mode, rank=LORA_RANK,
                             target=H.attention_and_conv_target, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    table = {"a photograph of an astronaut riding a horse": torch.randn(1, *spec["text"], generator=g),
             "": torch.randn(1, *spec["text"], generator=g)}
    prompts = PromptList([next(iter(table))], encode=table.__getitem__)
    config = DIConfig(batch_size=batch, omega=memory.OMEGA, alpha=memory.ALPHA, seed=0)
    trainer = engine.build_engine(models, prompts, config, TargetReward(torch.zeros(latent)), device=device)
    sync(device)
    row: dict[str, Any] = {"build_s": time.perf_counter() - t0,
                           "params": params,
                           "generator_trainable": sum(p.numel() for p in models.generator_params)}
    if device.type == "cuda":
        row["built_gib"] = torch.cuda.memory_allocated(device) / GIB
    times, finite = [], True
    for step in range(warmup + iters):
        sync(device)
        t1 = time.perf_counter()
        m = trainer.train_step(step)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t1)
        finite = finite and all(math.isfinite(float(m[k])) for k in ("ta_loss", "generator_grad_norm"))
    row.update(s_per_it=statistics.median(times), min_s=min(times), timed=len(times), warmup=warmup, finite=finite)
    return row


def unet_rows(device: torch.device, quick: bool, deadline: float, emit: Callable[[dict[str, Any]], None]) -> None:
    """Every (mode, batch) row; each builds its own engine so that its peak memory is its own."""
    spec = UNETS[device.type]
    warmup, iters = (1, 1) if quick or device.type != "cuda" else (2, 3)
    for mode in MODES:
        for batch in spec["batches"]:
            row: dict[str, Any] = {"mode": mode, "batch": batch, "model": spec["label"], "dtype": "bf16"}
            if time.monotonic() > deadline:
                emit({**row, "error": "not run: over the time budget"})
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row.update(_train_row(spec, mode, batch, device, warmup, iters))
            except Exception as exc:  # out of memory included: the row says so and the next one runs
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
                row["error"] = ("out of memory: " if oom else "") + f"{type(exc).__name__}: {str(exc)[:300]}"
            # the engine of the failed or finished row is unreachable only now (the exception held its frames)
            gc.collect()
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
                torch.cuda.empty_cache()
            emit(row)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (the no-GPU test)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="no new case or row starts after this")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    device = torch.device(args.device)
    if device.type == "cpu":  # a smoke on a shared machine: more threads than free cores slows it tenfold
        torch.set_num_threads(1)
    result: dict[str, Any] = {"device": args.device, "copy": None, "kernels": [], "unet": [], "done": False}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    target_s = 0.02 if args.quick or device.type != "cuda" else 0.15
    result["copy"] = copy_bandwidth(device, COPY_BYTES[device.type], target_s)
    save()
    print(f"copy: {result['copy']['gbs']:.1f} GB/s", flush=True)

    def kernel_row(row: dict[str, Any]) -> None:
        result["kernels"].append(row)
        save()

    kernel_rows(device, result["copy"]["gbs"], target_s, deadline, kernel_row)
    print(f"kernels: {len(result['kernels'])} cases", flush=True)

    def unet_row(row: dict[str, Any]) -> None:
        result["unet"].append(row)
        save()
        print(f"unet {row['mode']} batch {row['batch']}: "
              f"{row.get('error') or format(row['s_per_it'], '.3f') + ' s/it'}", flush=True)

    unet_rows(device, args.quick, deadline, unet_row)
    result["done"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
