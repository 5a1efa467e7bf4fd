"""report.md of `make gpu-check` (bench/gpu_check.py) from its report dictionary (report.json)."""

from __future__ import annotations

from typing import Any


def _f(value: Any, spec: str, dash: str = "—") -> str:
    return dash if value is None else format(value, spec)


VERDICTS = {"pass": "PASS", "fail": "FAIL", "no-gpu": "NO GPU PRESENT"}


def summary(report: dict[str, Any]) -> str:
    """What the verdict rests on, one sentence."""
    m = report["machine"]
    if not m["gpu"]:
        ran = "The CPU-side parts ran" + (" and passed" if not report["failed"]
                                          else f"; FAILED: {', '.join(report['failed'])}")
        return (f"{m['why_no_gpu']}. {ran}; the device build, the CUDA tests on the device, the kernel bandwidth "
                "and the SD1.5 DI++ timings need a GPU and were not run")
    failed = f"; failed: {', '.join(report['failed'])}" if report["failed"] else ""
    return f"{m['device']} (compute capability {m['capability']}){failed}"


def verdict(report: dict[str, Any]) -> str:
    if report["status"] == "fail" and not report["machine"]["gpu"]:
        return "FAIL, NO GPU PRESENT"
    return VERDICTS[report["status"]]


def headline(report: dict[str, Any]) -> str:
    return f"{verdict(report)}: {summary(report)}"


def _machine(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    nvcc = m["nvcc"]
    lines = ["## Machine", "",
             f"- Python {m['python']}, {m['platform']}, {m['cpus']} CPUs; PyTorch {m.get('torch') or 'not importable'}"
             + (f" (CUDA {m['torch_cuda']})" if m.get("torch_cuda") else "")]
    if m["gpu"]:
        lines.append(f"- GPU: {m['device']}, compute capability {m['capability']}, {m['memory_gib']:.1f} GiB, "
                     f"{m['multiprocessors']} SMs ({m['device_count']} device(s); device 0 used)")
    else:
        lines.append(f"- GPU: **none** — {m['why_no_gpu']}")
    if nvcc.get("path"):
        archs = ", ".join(f"sm_{a}" for a in nvcc.get("archs", [])) or nvcc.get("error", "?")
        lines.append(f"- nvcc: {nvcc['path']} ({nvcc.get('version', '?')}); builds {archs}")
    else:
        lines.append("- nvcc: not found (NVCC, PATH, /usr/local/cuda/bin)")
    if m.get("missing"):
        lines.append(f"- **missing Python packages: {', '.join(m['missing'])}** (the steps that import them fail)")
    return lines + [""]


def _build(report: dict[str, Any]) -> list[str]:
    b = report["build"]
    lines = ["## Build", ""]
    if b is None:
        return lines + ["Not run (--skip-build): the importable diffinstruct was used.", ""]
    target = f"the C extension and libdipp_cuda.so for sm_{b['arch']} + PTX" if b.get("arch") else \
        "the C extension only (no GPU to build CUDA for; `make build` builds libdipp_cuda.so for sm_75 to sm_120)"
    state = "ok" if b["ok"] else f"**FAILED**: {b['error']}"
    lines.append(f"{target}: {state}, {b['seconds']:.0f} s, into `{b['lib']}`"
                 + (f"; libdipp_cuda.so {b['cuda_library_mb']:.1f} MB" if "cuda_library_mb" in b else "") + ".")
    env = " ".join(f"{k}={v}" for k, v in b["env"].items())
    return lines + ["", f"`{env} python {b['command']}` (log: build.log)", ""]


def _tests(report: dict[str, Any]) -> list[str]:
    lines = ["## Tests", "", "| group | pytest | passed | failed | skipped | s | result |",
             "|---|---|---|---|---|---|---|"]
    for t in report["tests"]:
        result = "ok" if t["ok"] else f"**FAILED** {t.get('error', '')}".strip()
        lines.append(f"| {t['name']} | `{t['command']}` | {t.get('passed', '—')} | {t.get('failed', '—')} "
                     f"| {t.get('skipped', '—')} | {t['seconds']:.0f} | {result} |")
    lines.append("")
    for t in report["tests"]:
        for failure in t.get("failures", []):
            lines.append(f"- failed ({t['name']}): {failure}")
        for reason in t.get("skip_reasons", []):
            lines.append(f"- skipped ({t['name']}): {reason}")
    return lines + [""]


def _kernels(timing: dict[str, Any], gpu: bool) -> list[str]:
    copy = timing.get("copy")
    lines = ["## Kernel bandwidth" + ("" if gpu else " (CPU smoke: the code path, not a measurement)"), ""]
    if not copy:
        return lines + ["Not measured (the timing child stopped before the copy).", ""]
    lines += [f"Yardstick: `dst.copy_(src)` of {copy['bytes'] / 1024**3:.2f} GiB on the "
              f"{'device' if gpu else 'CPU'}, {copy['gbs']:.1f} GB/s (read + write counted; best call "
              f"{copy['best_gbs']:.1f} GB/s). Each kernel's GB/s is its byte model (bench/bench_cases.py) over its "
              "median time; every kernel was first checked against the PyTorch reference backend on the same buffers.",
              "", "| size | dtype | kernel | ms | GB/s | of copy | byte model |", "|---|---|---|---|---|---|---|"]
    for k in timing.get("kernels", []):
        if "error" in k:
            lines.append(f"| {k['size']} | {k['dtype']} | {k['kernel']} | — | — | — | {k['error'][:200]} |")
            continue
        lines.append(f"| {k['size']} | {k['dtype']} | {k['kernel']} | {1e3 * k['median_s']:.4f} | {k['gbs']:.1f} "
                     f"| {100 * k['of_copy']:.0f} % | {k['model']} |")
    if gpu:
        lines += ["", "At the SD1.5 size a call moves a few MB, which stays in L2 and is mostly launch latency; the "
                  "large size (64 MiB per float32 tensor) is the bandwidth figure."]
    return lines + [""]


def _unet(timing: dict[str, Any], gpu: bool) -> list[str]:
    rows = timing.get("unet", [])
    title = "## DI++ iterations" + ("" if gpu else " (CPU smoke on a tiny UNet: the code path, not a measurement)")
    lines = [title, ""]
    if not rows:
        return lines + ["Not run (the timing child stopped before them).", ""]
    lines += [f"Model: {rows[0]['model']}, bf16 weights, 4x{'64x64' if gpu else '8x8'} latents, one prompt's random "
              "conditioning; engine.assemble (shared: LoRA rank 16 on attention and convs over one frozen base; full: "
              "copies) + engine.build_engine, DITrainer.train_step with omega = 4.5 CFG and TargetReward "
              "(alpha = 0.1). Time: median of the timed iterations after warm-up, synchronised; peak: "
              "torch.cuda.max_memory_allocated over the row (building included).", "",
              "| mode | batch | s / iteration | peak GiB | after build GiB | trainable (G) | finite | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trainable = f"{r['generator_trainable'] / 1e6:.1f}M" if "generator_trainable" in r else "—"
        timed = f"{r['timed']} timed after {r['warmup']} warm-up" if "timed" in r else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {_f(r.get('s_per_it'), '.3f')} | {_f(r.get('peak_gib'), '.2f')} "
                     f"| {_f(r.get('built_gib'), '.2f')} | {trainable} "
                     f"| {'yes' if r.get('finite') else ('no' if 'finite' in r else '—')} "
                     f"| {r.get('error', timed)[:200]} |")
    return lines + [""]


def render(report: dict[str, Any]) -> str:
    gpu = report["machine"]["gpu"]
    lines = ["# GPU check", "", f"**Status: {verdict(report)}.** {summary(report)}.", "",
             f"Generated by `make gpu-check` (bench/gpu_check.py{' --quick' if report['quick'] else ''}) on "
             f"{report['date']} in {report['seconds']:.0f} s.", ""]
    if report["not_run"]:
        lines += ["Not run here:", ""] + [f"- {item}" for item in report["not_run"]] + [""]
    lines += _machine(report) + _build(report) + _tests(report)
    timing = report["timing"] or {}
    if timing.get("error"):
        lines += [f"**Timing: {timing['error']}.**", ""]
    lines += _kernels(timing, gpu) + _unet(timing, gpu)
    return "\n".join(lines).rstrip() + "\n"
