"""The Markdown report of bench/bench.py: tables, the targets' verdicts and the measured reasons for misses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import bench_cases as cases
from bench_contenders import LABELS

LARGE = "large 32x4x128x128"
LARGE_ROW = LARGE.split()[0]  # Row.size holds the size's first word
TRIAD_TARGET = 0.70
TORCH_TARGET = 3.0
CONTENDER_TARGET = 1.0  # ours at least as fast as every contender, in every row
GEN_COMPILE_TARGET = 1.5  # generator_grad (with its diagnostics) against torch.compile of its formula
DISTURBED = 0.05  # re-measure a case when other processes took more than this share of the CPUs
MAX_RETRIES = 3
GEN_KERNELS = ("generator_grad (CFG, norm)", "generator_grad (CFG, norm, +dr)")


@dataclass
class Timing:
    median: float
    q1: float
    q3: float
    reps: int


@dataclass
class Row:
    kernel: str
    size: str
    dtype: str
    nbytes: int
    numel: int
    nsets: int
    footprint: int
    c: Timing  # the fused kernel through the API with torch tensors
    c_np: Timing | None  # the same call with NumPy views of the same buffers (float32 only)
    torch: Timing | None
    numpy: Timing | None
    target: bool
    disturbed: float  # fraction of CPU capacity used by other processes while the row was measured
    others: dict[str, Timing] = field(default_factory=dict)  # contender name (bench_contenders) -> timing


def cpu_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


# ---------------------------------------------------------------------------------------------- report


def _gbs(r: Row, t: Timing | None = None) -> float:
    return r.nbytes / (t or r.c).median / 1e9


def _ratio(num: Timing | None, den: Timing) -> str:
    return "n/a" if num is None else f"{num.median / den.median:.2f}x"


def _ms(t: Timing | None) -> str:
    return "n/a" if t is None else f"{t.median * 1e3:.3f}"


def _label(r: Row) -> str:
    return r.kernel + (" (busy)" if r.disturbed > DISTURBED else "")


def table(rows: list[Row], copy: float, triad: float) -> list[str]:
    head = ("| kernel | size | dtype | MB/call | time ms | IQR % | GB/s | % copy | % triad | torch ms "
            "| x vs torch eager | numpy ms | x vs numpy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gbs, iqr = _gbs(r), (r.c.q3 - r.c.q1) / r.c.median * 100
        lines.append(
            f"| {_label(r)} | {r.size} | {r.dtype} | {r.nbytes / 1e6:.2f} | {r.c.median * 1e3:.3f} | {iqr:.0f} "
            f"| {gbs:.1f} | {gbs / copy * 100:.0f}% | {gbs / triad * 100:.0f}% | {_ms(r.torch)} "
            f"| {_ratio(r.torch, r.c)} | {_ms(r.numpy)} | {_ratio(r.numpy, r.c)} |"
        )
    return lines


def binding_table(rows: list[Row], triad: float) -> list[str]:
    lines = ["| kernel | size | torch tensors ms | NumPy arrays ms | difference ms | GB/s (NumPy args) "
             "| % triad (NumPy args) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.c_np is None:
            continue
        g = _gbs(r, r.c_np)
        lines.append(f"| {_label(r)} | {r.size} | {r.c.median * 1e3:.3f} | {r.c_np.median * 1e3:.3f} "
                     f"| {(r.c.median - r.c_np.median) * 1e3:.3f} | {g:.1f} | {g / triad * 100:.0f}% |")
    return lines


def contender_table(rows: list[Row], labels: dict[str, str]) -> list[str]:
    """Ours against each contender: its median ms and its time / ours (above 1: the fused kernel is faster)."""
    names = [k for k in labels if any(k in r.others for r in rows)]
    head = "| kernel | size | dtype | ours ms | " + " | ".join(f"{labels[k]} ms (x)" for k in names) + " | x vs best |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{_ms(r.others.get(k))} ({_ratio(r.others.get(k), r.c)})" if k in r.others else "n/a"
                 for k in names]
        best = min(r.others.values(), key=lambda t: t.median) if r.others else None
        lines.append(f"| {_label(r)} | {r.size} | {r.dtype} | {r.c.median * 1e3:.3f} | " + " | ".join(cells)
                     + f" | {_ratio(best, r.c)} |")
    return lines


def why_compile(r: Row, triad: float) -> str:
    """Why generator_grad misses its torch.compile target: what the target would ask of memory."""
    comp = r.others["compile"]
    need = comp.median / GEN_COMPILE_TARGET
    once = r.numel * (6 if "+dr" in r.kernel else 5) * (4 if r.dtype == "f32" else 2)  # inputs read once, G written
    parts = [f"torch.compile (inductor: one generated C++ kernel, a reduction loop and a write loop over the batch) "
             f"takes {comp.median * 1e3:.3f} ms, ours {r.c.median * 1e3:.3f} ms"]
    if r.size == LARGE_ROW:
        have, want = once / r.c.median / 1e9, once / need / 1e9
        verdict = ("more than this machine's triad bandwidth: memory, not the code, sets the ceiling" if want > triad
                   else "within triad bandwidth: memory is not saturated, the code falls short")
        parts.append(f"ours reads each input from memory once (a sample's second pass from cache): {have:.1f} GB/s "
                     f"of DRAM traffic, {have / triad * 100:.0f}% of triad; {GEN_COMPILE_TARGET:.1f}x would need "
                     f"{need * 1e3:.3f} ms, {want:.1f} GB/s ({want / triad * 100:.0f}% of triad) for the same bytes, "
                     f"{verdict}")
    return "; ".join(parts) + "."


def contender_targets(rows: list[Row], labels: dict[str, str], triad: float, whys: list[str]) -> list[str]:
    """PASS/MISS per row: ours >= CONTENDER_TARGET x every contender; generator_grad >= 1.5x torch.compile.
    Appends to whys an explanation of each undisturbed torch.compile miss."""
    lines = []
    for r in rows:
        if not r.others:
            continue
        name, best = min(r.others.items(), key=lambda kv: kv[1].median)
        speed = best.median / r.c.median
        want = CONTENDER_TARGET
        if r.kernel in GEN_KERNELS and "compile" in r.others:
            speed_c = r.others["compile"].median / r.c.median
            lines.append(f"{_verdict(r, speed_c >= GEN_COMPILE_TARGET)}: {r.kernel} ({r.size}, {r.dtype}) "
                         f"{speed_c:.2f}x vs torch.compile (target >= {GEN_COMPILE_TARGET:.1f}x)")
            if speed_c < GEN_COMPILE_TARGET and r.disturbed <= DISTURBED:
                whys.append(f"- **{r.kernel}** ({r.size}, {r.dtype}) vs torch.compile: {why_compile(r, triad)}")
        ok = speed >= want
        line = (f"{_verdict(r, ok)}: {r.kernel} ({r.size}, {r.dtype}) {speed:.2f}x vs the fastest contender "
                f"({labels.get(name, name)}, target >= {want:.1f}x)")
        if not ok and r.disturbed <= DISTURBED:
            line += f"; short by {(1 - speed) * 100:.0f}% ({r.c.median * 1e3:.3f} vs {best.median * 1e3:.3f} ms)"
        lines.append(line)
    return lines


def _verdict(r: Row, ok: bool) -> str:
    """PASS/MISS, or no verdict when other processes disturbed the row (busy timings can flip either way)."""
    if r.disturbed > DISTURBED:
        return f"NO VERDICT (busy {r.disturbed * 100:.0f}%, would read {'PASS' if ok else 'MISS'})"
    return "PASS" if ok else "MISS"


def find(rows: list[Row], kernel: str, size: str, dtype: str) -> Row | None:
    return next((r for r in rows if r.kernel == kernel and r.size == size and r.dtype == dtype), None)


# What the code does per element, where that (not memory) can bound a kernel. Facts about the
# current sources only; measurements carry the rest of each explanation.
CODE_REASONS = {
    "adam_step": "per element a square root and two divisions in torch.optim.Adam's order of operations "
                 "(vectorised; AVX2 clone on x86-64)",
    "add_noise": "Philox4x32-10 (16 blocks at a time, vectorised) plus Box-Muller with the project's own "
                 "correctly rounded log, sin and cos in double (dipp_math.h, vectorised) per pair of elements",
}


def why_bandwidth(r: Row, rows: list[Row], triad: float, threads: int, mhz: float | None,
                  per_tensor_us: float) -> str:
    """Short, measured explanation for a kernel below the triad target."""
    parts = []
    if r.kernel.startswith("add_noise"):
        fill = find(rows, "fill_normal", r.size, r.dtype)
        if fill is not None:
            rate = fill.numel / fill.c.median
            cyc = f", about {mhz * 1e6 * threads / rate:.0f} core cycles per element" if mhz else ""
            need = r.nbytes / (TRIAD_TARGET * triad * 1e9)
            parts.append(
                f"compute-bound: fill_normal alone, which only writes its output, takes {fill.c.median * 1e3:.2f} ms "
                f"for the same {fill.numel} elements ({rate / 1e6:.0f} M normals/s on {threads} threads{cyc}), "
                f"more than the {need * 1e3:.2f} ms the target allows for add_noise's bytes; add_noise takes "
                f"{r.c.median * 1e3:.2f} ms, so generating the normals, not memory, sets its speed")
    elif r.c_np is not None:
        g_np = _gbs(r, r.c_np)
        ntensors = cases.N_PARAM_TENSORS * (2 if r.kernel.startswith("ema") else 4) if "tensors" in r.kernel else 0
        if r.c.median - r.c_np.median > 0.15 * r.c.median:
            what = (f"{ntensors} tensors, about {per_tensor_us:.0f} us each" if ntensors
                    else f"about {per_tensor_us:.0f} us per tensor argument")
            parts.append(
                f"binding overhead: with NumPy views of the same buffers the call takes {r.c_np.median * 1e3:.2f} ms "
                f"instead of {r.c.median * 1e3:.2f} ms ({g_np:.1f} GB/s = {g_np / triad * 100:.0f}% of triad); "
                f"torch tensors pass through the Python wrapper and a DLPack capsule each ({what})")
        small = find(rows, r.kernel, "SD1.5", r.dtype)
        if g_np < TRIAD_TARGET * triad:
            hot = ""
            if small is not None and small.c_np is not None:
                g_hot = _gbs(small, small.c_np)
                hot = (f"; even with its data in cache (SD1.5 size) it reaches only {g_hot:.1f} GB/s, "
                       "so the loop is compute-bound, not memory-bound")
            parts.append(f"the kernel alone (NumPy arguments) reaches {g_np:.1f} GB/s = "
                         f"{g_np / triad * 100:.0f}% of triad{hot}")
    for key, text in CODE_REASONS.items():
        if r.kernel.startswith(key) and not (key == "add_noise" and not parts):
            parts.append("code: " + text)
            break
    return "; ".join(parts) + "." if parts else "not investigated."


def why_torch(r: Row, rows: list[Row], triad: float) -> str:
    assert r.torch is not None
    parts = [f"torch eager takes {r.torch.median * 1e3:.3f} ms, the fused kernel {r.c.median * 1e3:.3f} ms"]
    if r.c_np is not None:
        parts.append(f"{r.c_np.median * 1e3:.3f} ms with NumPy arguments (no DLPack)")
    f32 = find(rows, r.kernel, r.size, "f32")
    if r.dtype == "bf16" and f32 is not None:
        parts.append(f"in bfloat16 the fused kernel takes {r.c.median * 1e3:.3f} ms against "
                     f"{f32.c.median * 1e3:.3f} ms in float32 for half the bytes: the float32<->bfloat16 "
                     "conversions per element cost about what the saved traffic gains, while torch eager in "
                     "bfloat16 also halves the traffic of each of its passes")
    elif r.size != LARGE_ROW:
        parts.append("at this size every operand sits in cache, so torch's extra passes and temporaries are "
                     "cheap and fixed per-call costs (Python wrapper, DLPack hand-off of ten tensors, two OpenMP "
                     "fork/joins) weigh most; the difference to the NumPy-argument call measures the hand-off")
    else:
        parts.append(f"the fused kernel runs at {_gbs(r):.1f} GB/s ({_gbs(r) / triad * 100:.0f}% of triad)")
    return "; ".join(parts) + "."


def report(rows: list[Row], info: dict[str, str], stream: dict[str, float], sweep: list[tuple[int, float, float]],
           models: dict[str, str], overhead: dict[str, float], quick: bool) -> tuple[str, list[str]]:
    copy, triad = stream["copy"], stream["triad"]
    threads = int(info["threads"])
    mhz = cpu_mhz()
    per_tensor_us = overhead["per_tensor_us"]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/bench.py; do not edit by hand. -->",
        "",
        "This file is generated by `make bench`: `bench/bench.py` regenerates everything above the end-to-end "
        "section on every run, `bench/e2e.py` that section; edit the scripts, not this file.",
        "",
    ]
    if quick:
        out += ["**Quick run (`--quick`): few repeats, the numbers are a smoke test only.**", ""]
    out += ["## Machine", ""] + [f"- {k}: {v}" for k, v in info.items()]
    out += [
        "",
        "## Memory bandwidth (STREAM)",
        "",
        f"`_core.stream_copy` / `_core.stream_triad` on {stream['n'] // 2**20}M float32 elements per array "
        f"({_mb(4 * stream['n'])} each, far beyond the last-level cache) with {threads} OpenMP threads, the "
        "kernels' count; median of the repeats. Copy counts 8 bytes per element, triad 12.",
        "",
        f"- **copy: {copy:.1f} GB/s**, **triad: {triad:.1f} GB/s** (mean of the measurements before the kernels, "
        f"copy {stream['copy0']:.1f} / triad {stream['triad0']:.1f}, and after them, copy {stream['copy1']:.1f} / "
        f"triad {stream['triad1']:.1f})",
        "",
        "The same probes on smaller arrays (data in cache; why the SD1.5-size rows can exceed DRAM bandwidth):",
        "",
        "| elements per array | bytes per array | copy GB/s | triad GB/s |",
        "|---|---|---|---|",
    ]
    out += [f"| {n} | {_mb(4 * n)} | {c:.1f} | {t:.1f} |" for n, c, t in sweep]
    out += [
        "",
        "## Results",
        "",
        "Time: median per call of the public API (`diffinstruct.kernels`) with torch tensors, outputs passed with "
        "`out=` where the API has it, Python wrapper included. GB/s: bytes of the byte model below / median time. "
        "`x vs torch eager` and `x vs numpy`: their median time / the fused kernel's; above 1 the fused kernel is "
        "faster. IQR %: interquartile range of the fused kernel's times relative to the median. The SD1.5 rows "
        "reuse one buffer set (hot in cache); the large rows rotate over several buffer sets whose total exceeds "
        "2.5x the last-level cache, so every call reads DRAM (the same buffers for torch and numpy). A row marked "
        f"(busy) was measured while other processes used more than {DISTURBED * 100:.0f}% of the CPUs even after "
        "re-measuring; treat it with suspicion.",
        "",
    ]
    tab = table(rows, copy, triad)
    out += tab
    ctab = contender_table(rows, LABELS)
    out += [
        "",
        "### Against the strongest alternative",
        "",
        "Each contender's median time per call and, in brackets, its time / the fused kernel's (above 1 the "
        "fused kernel is faster), measured in the same run and interleaved with the fused kernel and the other "
        "implementations. torch.compile: inductor on the CPU (static shapes, default mode) of the kernel's "
        "formula in plain torch (`bench/bench_contenders.py`), returning the same outputs, per-sample diagnostics "
        "and non-finite counts included, in float32 arithmetic rounded once to the output dtype; "
        "Adam(fused=True) / Adam(foreach=True): `torch.optim.Adam` with the same state (bfloat16 moments for "
        "bfloat16 parameters, as torch creates them); `_foreach_lerp_`: `torch._foreach_lerp_(ema, params, "
        "1 - decay)`; the fills compare with torch's eager generator (`normal_`, `uniform_`) only. Every "
        "contender's outputs were checked against the PyTorch reference before it was timed. x vs best: the "
        "fastest contender's time / the fused kernel's.",
        "",
    ] + ctab
    out += [
        "",
        "### Binding overhead (float32)",
        "",
        "The same fused-kernel call with NumPy views of the same buffers instead of torch tensors. NumPy arrays "
        "enter the binding directly; torch tensors go through the Python wrapper (autograd detach, "
        "neg/conj checks) and a DLPack capsule from torch's C entry point. A call on 4-element tensors "
        f"(cfg_combine, 3 tensor arguments) costs {overhead['torch_us']:.1f} us "
        f"with torch tensors and {overhead['numpy_us']:.1f} us with NumPy arrays: about {per_tensor_us:.1f} us per "
        "torch tensor argument.",
        "",
    ]
    out += binding_table(rows, triad)
    out += ["", "## Byte model", "",
            "Each tensor counts once per pass that reads it and once per write, at its element size `s` "
            "(4 for float32, 2 for bfloat16; Adam's moments are float32 whatever the parameters' dtype); `n` = "
            "elements per call (the whole batch, or the sum over the parameter list). Per-sample vectors (sigma, "
            "losses, diagnostics) are negligible and not counted; neither is write-allocate traffic (as in STREAM).",
            "", "| kernel | bytes per call |", "|---|---|"]
    out += [f"| {k} | {m} |" for k, m in models.items()]

    lines: list[str] = []
    whys: list[str] = []
    for r in rows:
        if not (r.target and r.size == LARGE_ROW and r.dtype == "f32"):
            continue
        gbs = _gbs(r)
        frac = gbs / triad
        ok = frac >= TRIAD_TARGET
        need_ms = r.nbytes / (TRIAD_TARGET * triad * 1e9) * 1e3
        line = (f"{_verdict(r, ok)}: {r.kernel} (large, f32) {gbs:.1f} GB/s = {frac * 100:.0f}% of triad "
                f"(target >= {TRIAD_TARGET * 100:.0f}% = {TRIAD_TARGET * triad:.1f} GB/s)")
        if not ok and r.disturbed <= DISTURBED:
            line += (f"; short by {(TRIAD_TARGET - frac) * 100:.0f} points: {r.c.median * 1e3:.2f} ms would have to "
                     f"drop to {need_ms:.2f} ms ({r.c.median / (need_ms / 1e3):.2f}x faster)")
            whys.append(f"- **{r.kernel}** (large, f32): {why_bandwidth(r, rows, triad, threads, mhz, per_tensor_us)}")
        lines.append(line)
    for r in rows:
        if r.kernel not in GEN_KERNELS or r.torch is None:
            continue
        speed = r.torch.median / r.c.median
        ok = speed >= TORCH_TARGET
        line = (f"{_verdict(r, ok)}: {r.kernel} ({r.size}, {r.dtype}) {speed:.2f}x vs torch eager "
                f"(target >= {TORCH_TARGET:.0f}x faster)")
        if not ok and r.disturbed <= DISTURBED:
            line += (f"; short by a factor {TORCH_TARGET / speed:.2f}: {r.c.median * 1e3:.3f} ms would have to drop "
                     f"to {r.torch.median / TORCH_TARGET * 1e3:.3f} ms")
            whys.append(f"- **{r.kernel}** ({r.size}, {r.dtype}) vs torch eager: {why_torch(r, rows, triad)}")
        lines.append(line)
    lines += contender_targets(rows, LABELS, triad, whys)
    out += ["", "## Targets", "", "```"] + lines + ["```", ""]
    if whys:
        out += ["### Why the misses", ""] + whys + [""]

    fill = find(rows, "fill_normal", "large", "f32")
    notes = [
        f"- SD1.5 size: one latent tensor is {_mb(8 * 4 * 64 * 64 * 4)} in float32, so every operand of a call "
        f"fits in cache ({info['caches']}); GB/s above the DRAM STREAM numbers, and % copy / % triad above 100%, "
        "are expected there. Fixed per-call costs (binding, Python wrapper, OpenMP fork/join per pass) weigh more "
        "at this size.",
        f"- Large size: one latent tensor is {_mb(32 * 4 * 128 * 128 * 4)} in float32. The last-level cache here "
        f"is large ({info['caches']}), so one buffer set would largely stay in L3; rotating buffer sets makes these "
        "rows measure DRAM traffic, like STREAM. The 70%-of-triad targets use these rows (float32).",
        "- bfloat16 rows move half the bytes per element for the same float32 arithmetic, so they are more "
        "compute-bound and their % triad is lower by construction.",
        "- PyTorch eager runs with `torch.set_num_threads(_core.threads())`; NumPy is single-threaded. Both run the "
        "straightforward formula (`bench/bench_cases.py`); e.g. the generator gradient is `ref = u + w*(c-u); "
        "diff = ta - ref; W = 1/(x0-ref).abs().mean(dims).clamp_min(1e-5); G = (W*diff - alpha*dr)/B`. The fused "
        "kernels also return per-sample diagnostics (gap, surrogate, non-finite counts) that the eager code skips.",
        "- torch eager on bfloat16 inputs computes in bfloat16, as straightforward code would; NumPy has no "
        "bfloat16 (n/a). torch and NumPy draw normals with their own generators (torch: mt19937 + vectorised "
        "Box-Muller, NumPy: PCG64 + ziggurat), so for fill_normal/add_noise only the cost compares, not the values.",
        f"- EMA compares with `ema.lerp_(param, 1-decay)` per tensor, Adam with torch.optim.Adam's single-tensor "
        f"CPU update (lerp_, mul_/addcmul_, sqrt/div/add_, addcdiv_) per tensor, over {cases.N_PARAM_TENSORS} "
        "tensors whose sizes add up to the latent's element count.",
        "- Each row is re-measured (up to "
        f"{MAX_RETRIES} times) when /proc/stat shows other processes using more than {DISTURBED * 100:.0f}% of the "
        "CPUs during its measurement; the machine is shared with other work (builds, tests).",
    ]
    if fill is not None:
        rate = fill.numel / fill.c.median
        extra = f" (about {mhz * 1e6 * threads / rate:.0f} core cycles per element at {mhz:.0f} MHz)" if mhz else ""
        notes.append(f"- Random numbers: fill_normal produces {rate / 1e6:.0f} M float32 normals/s on {threads} "
                     f"threads{extra}, {4 * rate / 1e9:.2f} GB/s of output: generating normals, not memory, bounds "
                     "fill_normal and add_noise.")
    out += ["## Notes", ""] + notes + [""]
    return "\n".join(out), tab + [""] + ctab + [""] + lines
