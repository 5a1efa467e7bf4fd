"""Peak memory and time of ONE DI++ iteration, "full" vs "shared" LoRA mode, on an SD1.5-architecture UNet.

Usage: python bench/memory.py [--size sd15|small] [--dtype auto|float32|bfloat16] [--steps N] [--rank R]
                              [--output MEMORY.md] [--no-output]

The UNet is UNet2DConditionModel built from SD1.5's published config (written below; random weights, no
download), batch 1, 4x64x64 latents, conditioning a random [1, 77, 768] tensor, CPU. One iteration is
DITrainer.train_step: a TA step and a generator step, with omega = 4.5 CFG and a cheap built-in reward
(TargetReward toward 0, alpha = 0.1) so the reward path runs. Each mode runs in a fresh subprocess;
its memory is the peak RSS (VmHWM of /proc/self/status) after the first iteration minus the RSS right
after the imports, so model construction, the deep copies of full mode, the optimiser states and the
EMA all count. Later iterations (--steps, default 2) only add the steady-state time per iteration;
the first one pays for allocating the optimiser state.

Memory safety (the machine is shared): before a mode starts, its peak is projected from the parameter
count (weights, EMA, gradients, two float32 Adam states) and compared with MemAvailable. --dtype auto
takes float32 when the full mode fits and bfloat16 weights otherwise (both modes alike, so the ratio
compares like with like); a mode that fits in neither is not run. The child also caps its own address
space at MemAvailable minus a reserve (an allocation past it fails as an error instead of swapping or
waking the OOM killer), and the parent kills the child if MemAvailable still falls under a floor.

The Markdown table goes to stdout and, unless --no-output, to MEMORY.md (regenerated each run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2

# SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), written out: no download.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
}
# A small UNet of the same family for the test suite: big enough that weights and optimiser state dominate
# (as they do at SD1.5 size), small enough to run both modes in seconds.
SMALL_UNET: dict[str, Any] = {
    **SD15_UNET, "sample_size": 16, "block_out_channels": [128, 256], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
SIZES: dict[str, dict[str, Any]] = {
    "sd15": {"config": SD15_UNET, "latent": 64, "text": (77, 768), "label": "SD1.5 UNet (860M parameters)"},
    "small": {"config": SMALL_UNET, "latent": 16, "text": (77, 768), "label": "small UNet (128, 256)"},
}
MODES = ("full", "shared")
TARGET_RATIO = 0.45
TARGET_KERNEL_SHARE = 0.02
RESERVE = int(0.75 * GIB)  # left free for everyone else: the child's address-space cap stops short of it
FLOOR = int(0.25 * GIB)  # the parent kills the child if MemAvailable falls under this
OMEGA = 4.5
ALPHA = 0.1


# ---------------------------------------------------------------------------------------------- /proc
def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def mem_available() -> int:
    info = meminfo()
    return info.get("MemAvailable", info.get("MemFree", 0))


def status_bytes(key: str) -> int:
    """VmRSS / VmHWM / VmSize of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def busy_seconds() -> float:
    """CPU-seconds all CPUs spent busy (incl. steal) since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- projection
def parameter_count(size: str) -> int:
    """The UNet's parameter count, built on the meta device (no memory, no init)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(SIZES[size]["config"])
    return sum(p.numel() for p in model.parameters())


def projected_peak(mode: str, params: int, weight_bytes: int) -> int:
    """Bytes the first iteration needs at least: parameter-sized state (activations come on top).

    full:   teacher + TA + generator weights, generator EMA, generator gradients, float32 Adam v for TA and
            generator (DI++'s default beta1 = 0 keeps no first moment; the peak is at the generator's step).
    shared: one base plus gradients of the activations' worth; LoRA state is small (allowance 10 %).
    """
    if mode == "full":
        return params * (5 * weight_bytes + 8)
    return int(params * weight_bytes * 1.1)


def choose_dtype(size: str, requested: str, available: int) -> tuple[str, str, int]:
    """(dtype, reason, params) for both modes."""
    params = parameter_count(size)
    if requested != "auto":
        return requested, f"--dtype {requested}", params
    need32 = projected_peak("full", params, 4)
    if need32 + RESERVE <= available:
        return "float32", (f"float32: full mode projects {need32 / GIB:.1f} GiB, within MemAvailable "
                           f"{available / GIB:.1f} GiB"), params
    need16 = projected_peak("full", params, 2)
    return "bfloat16", (f"bfloat16 weights: float32 full mode needs at least {need32 / GIB:.1f} GiB "
                        f"(3 x {params * 4 / GIB:.1f} GiB weights, EMA, gradients, and {params * 8 / GIB:.1f} GiB "
                        f"of float32 Adam state for TA and generator) > MemAvailable {available / GIB:.1f} GiB; with "
                        f"bf16 weights it projects {need16 / GIB:.1f} GiB (Adam state stays float32)"), params


# ---------------------------------------------------------------------------------------------- the child
def child(mode: str, size: str, dtype_name: str, steps: int, rank: int, seed: int, threads: int = 0) -> None:
    """Runs in a fresh process: prints one JSON line per finished iteration, then a final one."""
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401 - diffusers imports lazily: count its modules here

    # engine imports these on first use: import them before the baseline so their modules do not count as the run's
    import diffinstruct.assembly  # noqa: F401
    import diffinstruct.runner  # noqa: F401
    import diffinstruct.trainer  # noqa: F401
    from diffinstruct import engine
    from diffinstruct.config import DIConfig
    from diffinstruct.hosts import diffusers as H
    from diffinstruct.prompts import PromptList
    from diffinstruct.rewards import TargetReward

    if threads > 0:
        torch.set_num_threads(threads)
    baseline = status_bytes("VmRSS")
    vm_baseline = status_bytes("VmSize")
    available = mem_available()
    cap = vm_baseline + max(0, available - RESERVE)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def emit(record: dict[str, Any]) -> None:
        print("RESULT " + json.dumps(record), flush=True)

    info: dict[str, Any] = {"mode": mode, "size": size, "dtype": dtype_name, "baseline_mib": baseline / MIB,
                            "available_mib": available / MIB, "as_cap_mib": cap / MIB, "threads":
                            torch.get_num_threads()}
    spec = SIZES[size]
    dtype = getattr(torch, dtype_name)
    try:
        t0 = time.perf_counter()
        unet = H.build_model("unet", spec["config"], dtype=dtype, seed=seed)
        teacher = H.unet_denoiser(unet)  # SD1.5: scaled_linear table, eps prediction
        latent = (4, spec["latent"], spec["latent"])
        models = engine.assemble(teacher, latent, mode=mode, rank=rank, target=H.attention_and_conv_target)
        g = torch.Generator().manual_seed(seed)
        table = {"a photograph of an astronaut riding a horse": torch.randn(1, *spec["text"], generator=g),
                 "": torch.randn(1, *spec["text"], generator=g)}
        prompts = PromptList([next(iter(table))], encode=table.__getitem__)
        config = DIConfig(batch_size=1, omega=OMEGA, alpha=ALPHA, seed=seed)
        trainer = engine.build_engine(models, prompts, config, TargetReward(torch.zeros(latent)))
        info.update(build_s=time.perf_counter() - t0, params=sum(p.numel() for p in unet.parameters()),
                    generator_trainable=sum(p.numel() for p in models.generator_params),
                    ta_trainable=sum(p.numel() for p in models.ta_params),
                    rss_built_mib=(status_bytes("VmRSS") - baseline) / MIB)
    except (RuntimeError, MemoryError) as exc:
        emit({**info, "error": f"building: {type(exc).__name__}: {str(exc)[:300]}"})
        return
    iterations = run_iterations(trainer, steps, info, emit, baseline, vm_baseline)
    emit({**info, "iterations": iterations, "done": True})


def run_iterations(trainer: Any, steps: int, info: dict[str, Any], emit: Any, baseline: int,
                   vm_baseline: int) -> list[dict[str, Any]]:
    """Train `steps` iterations through the package's loop (runner.run, no run folder), recording each one;
    a failed one (RuntimeError, MemoryError: the address-space cap) ends them with its error in info["error"]."""
    from diffinstruct import runner

    class Recorder(runner.RunHooks):
        def __init__(self) -> None:
            self.iterations: list[dict[str, Any]] = []

        def after_step(self, completed: int, m: dict[str, Any]) -> None:
            record = {k: float(m[k]) for k in ("time_total", "time_kernels", "time_networks", "ta_loss", "ta_ok",
                                              "generator_ok", "generator_grad_norm", "reward")}
            record["finite"] = all(math.isfinite(record[k]) for k in ("ta_loss", "generator_grad_norm", "reward"))
            record["peak_mib"] = (status_bytes("VmHWM") - baseline) / MIB
            record["rss_mib"] = (status_bytes("VmRSS") - baseline) / MIB
            record["vm_peak_mib"] = (status_bytes("VmPeak") - vm_baseline) / MIB  # address space, against the cap
            self.iterations.append(record)
            emit({**info, "iterations": self.iterations})

    hooks = Recorder()
    if steps > 0:  # the loop wants at least one step; --steps 0 reports the build alone, as it always has
        try:
            runner.run(trainer, runner.RunOptions(steps, None, steps, curves=False), hooks)
        except (RuntimeError, MemoryError) as exc:
            info["error"] = f"iteration {len(hooks.iterations) + 1}: {type(exc).__name__}: {str(exc)[:300]}"
    return hooks.iterations


def kernel_child(size: str, dtype_name: str) -> None:
    """Steady-state optimiser + EMA time on one network's real parameter shapes (what full mode runs twice).

    Full mode's second iteration does not fit in memory next to the first's state at SD1.5 size in
    bf16, so its steady-state kernel time is measured here on one network: FusedAdam.step (the second
    call, state already allocated) and EMA.update over the UNet's parameter list.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from diffinstruct.optim import EMA, FusedAdam

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        shapes = [p.shape for p in UNet2DConditionModel.from_config(SIZES[size]["config"]).parameters()]
    g = torch.Generator().manual_seed(0)
    params = [nn_param(torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) * 0.02) for shape in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
    opt, ema = FusedAdam(params, lr=5e-6), EMA(params, 0.95)
    t0 = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t0
    steady = []
    for _ in range(2):
        t0 = time.perf_counter()
        opt.step()
        steady.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ema.update()
    ema_s = time.perf_counter() - t0
    numel = sum(p.numel() for p in params)
    print("RESULT " + json.dumps({"params": numel, "dtype": dtype_name, "adam_first_s": first,
                                  "adam_steady_s": min(steady), "ema_s": ema_s, "done": True}), flush=True)


def nn_param(t: Any) -> Any:
    import torch

    return torch.nn.Parameter(t)


# ---------------------------------------------------------------------------------------------- the parent
def measure(mode: str, size: str = "sd15", dtype: str = "float32", steps: int = 1, rank: int = 16, seed: int = 0,
            threads: int = 0, timeout: float = 3600.0) -> dict[str, Any]:
    """One mode ("full", "shared", or "kernels": kernel_child) in a fresh subprocess; returns its last report
    (with "error" when it did not finish)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--size", size, "--dtype", dtype,
           "--steps", str(steps), "--rank", str(rank), "--seed", str(seed), "--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python_shim"), env.get("PYTHONPATH")]))
    killed: list[str] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.2):
            if mem_available() < FLOOR:
                killed.append(f"killed: MemAvailable fell under {FLOOR / MIB:.0f} MiB")
                proc.send_signal(signal.SIGKILL)
                return
            if time.perf_counter() - t0 > timeout:
                killed.append(f"killed: over the {timeout:.0f} s timeout")
                proc.send_signal(signal.SIGKILL)
                return

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        done.set()
        guard.join()
    wall = time.perf_counter() - t0
    lines = [ln[len("RESULT "):] for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"mode": mode, "size": size, "dtype": dtype}
    result["wall_s"] = wall
    # CPU time of other processes while this mode ran (the machine is shared): busy CPU-seconds minus our own
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["others_cpu_share"] = max(0.0, busy_seconds() - busy0 - own) / (wall * (os.cpu_count() or 1))
    if killed:
        result["error"] = killed[0]
    elif proc.returncode != 0 and "error" not in result:
        result["error"] = f"exit status {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    elif not result.get("done") and "error" not in result:
        result["error"] = "no final report"
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def kernel_lines(kr: dict[str, Any], results: dict[str, dict[str, Any]], dtype: str) -> list[str]:
    """Full mode's steady-state kernel share from the one-network optimiser/EMA measurement."""
    if kr.get("error") or "adam_steady_s" not in kr:
        return [f"Full mode, steady-state kernels: {kr.get('error', 'no result')}."]
    b = 4 if dtype == "float32" else 2
    # param read + write, grad read, v read + write (beta1 = 0: no first moment is kept)
    rate = kr["params"] * (3 * b + 8) / kr["adam_steady_s"] / 1e9
    full_its = results.get("full", {}).get("iterations") or []
    why = ("its iteration 2 did not fit in memory beside iteration 1's state here, so " if len(full_its) < 2
           else "as a cross-check, ")
    lines = [f"Full mode, steady state: {why}its optimiser and EMA are measured apart, on one network's "
             f"{kr['params'] / 1e6:.1f}M {dtype} parameters: FusedAdam.step {kr['adam_steady_s']:.2f} s "
             f"({rate:.1f} GB/s; the first call, allocating the float32 state, {kr['adam_first_s']:.2f} s), "
             f"EMA.update {kr['ema_s']:.2f} s."]
    shared = results.get("shared", {}).get("iterations") or []
    if full_its:
        it = full_its[-1]
        rest = shared[-1]["time_kernels"] if shared else 0.0  # per-sample kernels + LoRA Adam: an upper bound
        kern = 2 * kr["adam_steady_s"] + kr["ema_s"] + rest
        total = kern + it["time_networks"]
        verdict = "meets" if kern / total <= TARGET_KERNEL_SHARE else "misses"
        lines.append(f"Full mode runs Adam twice (TA, generator) and the EMA once per iteration: about {kern:.1f} s "
                     f"of kernels against {it['time_networks']:.1f} s of networks (iteration {len(full_its)}'s), "
                     f"i.e. kernels ~{100 * kern / total:.1f} % of a steady-state full-mode iteration ({verdict} the "
                     f"{100 * TARGET_KERNEL_SHARE:.0f} % target).")
    return lines


def report(results: dict[str, dict[str, Any]], size: str, dtype: str, reason: str, params: int,
           available: int, rank: int, skipped: dict[str, str], kernels: dict[str, Any] | None = None) -> str:
    spec = SIZES[size]
    lines = [
        "# Memory: one DI++ iteration, full vs shared LoRA",
        "",
        f"Generated by `python bench/memory.py{'' if size == 'sd15' else ' --size ' + size}` on "
        f"{datetime.date.today().isoformat()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {meminfo()['MemTotal'] / GIB:.1f} GiB RAM (MemAvailable at start "
        f"{available / GIB:.1f} GiB).",
        "",
        f"Model: {spec['label']}, `UNet2DConditionModel` from its published config, random weights; batch 1, "
        f"4x{spec['latent']}x{spec['latent']} latents, conditioning a random [1, {spec['text'][0]}, "
        f"{spec['text'][1]}] tensor; DITrainer.train_step (TA step + generator step), omega = {OMEGA} CFG, "
        f"TargetReward (alpha = {ALPHA}); shared mode: LoRA rank {rank} on attention q/k/v/out and every conv.",
        f"Weights dtype: {reason}.",
        "",
        "Peak = peak RSS (VmHWM) after the first iteration minus the RSS right after the imports, each mode in a "
        "fresh process. Time: the trainer's own split (`time_kernels` = our fused kernels incl. the optimiser and "
        "EMA, `time_networks` = everything else: network passes, autograd); iteration 1 includes allocating the "
        "optimiser state, iteration 2 is steady state.",
        "",
        "| mode | trainable (G / TA) | peak MiB | iter 1 s | kernels % | iter 2 s | kernels % | networks s (it 2) "
        "| others' CPU | finite |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        if mode in skipped:
            lines.append(f"| {mode} | — | not run | | | | | | | {skipped[mode]} |")
            continue
        r = results.get(mode, {})
        its = r.get("iterations", [])
        it1 = its[0] if its else None
        it2 = its[1] if len(its) > 1 else None
        trainable = (f"{r['generator_trainable'] / 1e6:.1f}M / {r['ta_trainable'] / 1e6:.1f}M"
                     if "generator_trainable" in r else "—")
        lines.append(
            f"| {mode} | {trainable} | {_fmt(it1 and it1['peak_mib'], '.0f')} "
            f"| {_fmt(it1 and it1['time_total'], '.1f')} "
            f"| {_fmt(it1 and 100 * it1['time_kernels'] / it1['time_total'], '.2f')} "
            f"| {_fmt(it2 and it2['time_total'], '.1f')} "
            f"| {_fmt(it2 and 100 * it2['time_kernels'] / it2['time_total'], '.2f')} "
            f"| {_fmt(it2 and it2['time_networks'], '.1f')} | {100 * r.get('others_cpu_share', 0.0):.0f} % "
            f"| {'yes' if its and all(i['finite'] for i in its) else 'no'} |")
    lines.append("")
    full = results.get("full", {}).get("iterations")
    shared = results.get("shared", {}).get("iterations")
    if full and shared:
        ratio = shared[0]["peak_mib"] / full[0]["peak_mib"]
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        lines.append(f"**shared / full peak = {ratio:.3f}** ({verdict} the target <= {TARGET_RATIO}).")
    for mode in MODES:
        its = results.get(mode, {}).get("iterations") or []
        if its:
            it = its[-1]
            share = it["time_kernels"] / it["time_total"]
            verdict = "meets" if share <= TARGET_KERNEL_SHARE else "misses"
            lines.append(f"- {mode}: kernels {100 * share:.2f} % of iteration {len(its)} "
                         f"({it['time_kernels']:.2f} s of {it['time_total']:.1f} s; {verdict} the <= "
                         f"{100 * TARGET_KERNEL_SHARE:.0f} % target).")
    lines.append("")
    lines.append(f"Parameters: {params / 1e6:.1f}M. Projected parameter-sized state of the first iteration "
                 f"(weights, EMA, gradients, float32 Adam; activations come on top): full "
                 f"{projected_peak('full', params, 4 if dtype == 'float32' else 2) / GIB:.2f} GiB, shared "
                 f"{projected_peak('shared', params, 4 if dtype == 'float32' else 2) / GIB:.2f} GiB.")
    for mode in MODES:
        r = results.get(mode, {})
        if r.get("error"):
            lines.append(f"- {mode}: {r['error']}")
        if "rss_built_mib" in r:
            lines.append(f"- {mode}: RSS after building the models {r['rss_built_mib']:.0f} MiB; imports baseline "
                         f"{r['baseline_mib']:.0f} MiB; {r.get('threads')} threads; whole run {r['wall_s']:.0f} s.")
    if kernels is not None:
        lines.append("")
        lines.extend(kernel_lines(kernels, results, dtype))
    lines.append("")
    lines.append("'others' CPU' is the share of the machine's CPU time that other processes used while the mode "
                 "ran; timings on a shared machine are only as good as that number is small.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="sd15")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--steps", type=int, default=2, help="iterations per mode (the peak is the first one's)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each mode (0: torch's default)")
    parser.add_argument("--modes", default="shared,full", help="comma-separated, run in this order")
    parser.add_argument("--output", type=Path, default=ROOT / "MEMORY.md")
    parser.add_argument("--no-output", action="store_true", help="print only")
    parser.add_argument("--child", choices=(*MODES, "kernels"), help=argparse.SUPPRESS)
    parser.add_argument("--no-kernels", action="store_true", help="skip the steady-state optimiser/EMA measurement")
    args = parser.parse_args(argv)
    if args.child == "kernels":
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        kernel_child(args.size, args.dtype)
        return 0
    if args.child:
        child(args.child, args.size, args.dtype, args.steps, args.rank, args.seed, args.threads)
        return 0

    available = mem_available()
    dtype, reason, params = choose_dtype(args.size, args.dtype, available)
    weight_bytes = 4 if dtype == "float32" else 2
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
        need, now = projected_peak(mode, params, weight_bytes), mem_available()
        if need + RESERVE > now:
            skipped[mode] = (f"projected {need / GIB:.1f} GiB + {RESERVE / GIB:.2f} GiB reserve > MemAvailable "
                             f"{now / GIB:.1f} GiB")
            print(f"{mode}: not run ({skipped[mode]})", file=sys.stderr, flush=True)
            continue
        print(f"{mode}: {dtype}, {args.steps} iteration(s) ...", file=sys.stderr, flush=True)
        results[mode] = measure(mode, args.size, dtype, args.steps, args.rank, args.seed, args.threads)
        its = results[mode].get("iterations", [])
        print(f"{mode}: peak {its[0]['peak_mib'] if its else float('nan'):.0f} MiB, "
              f"{results[mode].get('error', 'ok')}", file=sys.stderr, flush=True)
    kernel_result: dict[str, Any] | None = None
    if not args.no_kernels and "full" in results:
        need, now = params * (3 * weight_bytes + 16), mem_available()
        if need + RESERVE <= now:
            print("kernels: steady-state optimiser and EMA on one network ...", file=sys.stderr, flush=True)
            kernel_result = measure("kernels", args.size, dtype, threads=args.threads)
        else:
            kernel_result = {"error": f"not run: projected {need / GIB:.1f} GiB > MemAvailable {now / GIB:.1f} GiB"}
    text = report(results, args.size, dtype, reason, params, available, args.rank, skipped, kernel_result)
    print(text)
    if not args.no_output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(not r.get("error") for r in results.values()) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
