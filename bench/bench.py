"""Benchmark of the fused DI++ CPU kernels against STREAM bandwidth, PyTorch eager and NumPy.

Usage: python bench/bench.py [--quick] [--size sd15|large|all] [--check] [--output BENCHMARKS.md]

Every kernel runs at the SD1.5 latent size (8x4x64x64) and a large size (32x4x128x128), in float32 and
bfloat16, through the public API (diffinstruct.kernels). Before a case is timed, its fused kernel runs
once and its outputs must match the same call on the PyTorch reference backend (bench_cases.Case.check);
a mismatch stops the run with exit status 1. --check only validates, without timing. The Markdown report
goes to stdout and, with --output, to a file that is regenerated on each run (keeping the e2e section that
bench/e2e.py writes).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cases as cases  # noqa: E402
import bench_contenders as contenders  # noqa: E402
from bench_report import DISTURBED, LARGE, MAX_RETRIES, Row, Timing, _gbs, _mb, _ms, cpu_mhz, report  # noqa: E402

from diffinstruct import _core  # noqa: E402
from diffinstruct import kernels as K  # noqa: E402

SIZES = {"SD1.5 8x4x64x64": (8, 4, 64, 64), LARGE: (32, 4, 128, 128)}
SIZE_CHOICES = {"sd15": ["SD1.5 8x4x64x64"], "large": [LARGE], "all": list(SIZES)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
STREAM_N = 64 * 1024 * 1024  # float32 elements per STREAM array (256 MiB each)
MAX_TOTAL_RETRIES = 8
QUIET_WAIT = 8.0  # at most this long (s) waiting for a quiet machine before a re-measurement


@dataclass
class Settings:
    budget_s: float  # time spent per implementation and case (split over rounds)
    rounds: int  # implementations alternate this many times per case
    min_reps: int
    max_reps: int
    stream_reps: int


# Many short rounds (blocks of ~50 ms per implementation): a shared machine's memory bandwidth drifts over
# seconds, and short blocks spread that drift over every implementation alike.
FULL = Settings(budget_s=0.6, rounds=12, min_reps=12, max_reps=600, stream_reps=15)
QUICK = Settings(budget_s=0.05, rounds=1, min_reps=3, max_reps=30, stream_reps=3)


# ---------------------------------------------------------------------------------------------- timing


def _time_calls(fns: list[Callable[[], object]], reps: int, start: int = 0) -> list[float]:
    out = []
    for i in range(reps):
        f = fns[(start + i) % len(fns)]
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return out


def _busy_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs from /proc/stat; (0, 0) where it cannot be read."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    steal = f[7] if len(f) > 7 else 0
    return sum(f[:8]) - idle - steal, steal


class Disturbance:
    """CPU time that other processes (and the hypervisor, as steal) took while a block ran, as a fraction
    of the machine's capacity: busy time of all CPUs minus this process's own CPU time."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> Disturbance:
        self.t0, self.cpu0, self.ticks0 = time.perf_counter(), self._own(), _busy_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, own = time.perf_counter() - self.t0, self._own() - self.cpu0
        busy, steal = (b - a for a, b in zip(self.ticks0, _busy_ticks(), strict=True))
        capacity = wall * (os.cpu_count() or 1)
        self.fraction = max(0.0, (busy + steal) / self.TICK - own) / capacity if capacity > 0 else 0.0

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime


def wait_quiet(max_wait: float, window: float = 0.5) -> float:
    """Sleeps until other processes use at most DISTURBED of the CPUs over `window` s (at most max_wait s)."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        with Disturbance() as d:
            time.sleep(window)
        if d.fraction <= DISTURBED:
            break
    return time.perf_counter() - start


def _summary(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[0], q[2], len(samples))


def measure_case(impls: dict[str, list[Callable[[], object]] | None], s: Settings) -> dict[str, Timing | None]:
    """Warm up every implementation on every buffer set, then time them in alternating rounds."""
    plan: dict[str, int] = {}
    for name, fns in impls.items():
        if fns is None:
            continue
        for f in fns:  # touch every set once (first-touch page faults, allocator warm-up)
            f()
        est = min(_time_calls(fns, 3))
        per_round = s.budget_s / s.rounds / max(est, 1e-7)
        plan[name] = max(math.ceil(s.min_reps / s.rounds), min(int(per_round), s.max_reps // s.rounds))
    samples: dict[str, list[float]] = {name: [] for name in plan}
    gc.disable()
    try:
        for r in range(s.rounds):
            for name, reps in plan.items():
                fns = impls[name]
                assert fns is not None
                fns[0]()  # one untimed call after switching implementation (thread pools wake up)
                samples[name] += _time_calls(fns, reps, start=r * reps)
    finally:
        gc.enable()
    return {name: (_summary(samples[name]) if name in samples else None) for name in impls}


def stream_bandwidth(n: int, reps: int) -> tuple[float, float]:
    """STREAM copy (8 B/elem) and triad (12 B/elem) GB/s with the kernels' OpenMP threads; best-of-median."""
    a, b, c = (np.full(n, v, np.float32) for v in (0.0, 1.0, 2.0))
    _core.stream_copy(a, b)
    _core.stream_triad(a, b, c, 3.0)
    copy = statistics.median(_time_calls([lambda: _core.stream_copy(a, b)], reps))
    triad = statistics.median(_time_calls([lambda: _core.stream_triad(a, b, c, 3.0)], reps))
    return 8 * n / copy / 1e9, 12 * n / triad / 1e9


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def caches() -> dict[int, int]:
    """Largest cache size (bytes) per level, from sysfs."""
    out: dict[int, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = int((d / "level").read_text())
            if (d / "type").read_text().strip() == "Instruction":
                continue
            size = (d / "size").read_text().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1], 1)
            out[level] = max(out.get(level, 0), int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return out


# ---------------------------------------------------------------------------------------------- main


class ValidationFailed(Exception):
    """A fused kernel disagreed with the PyTorch reference: nothing of that case is timed."""


def check_all(sizes: list[str], log: Callable[[str], None]) -> int:
    """--check: every case validated against the reference, nothing timed; the exit status."""
    failed = 0
    for size in sizes:
        for dname, dtype in DTYPES.items():
            for builder, kw, _target in cases.ALL_BUILDERS:
                case = contenders.attach(builder(SIZES[size], dtype, 1, **kw))
                try:
                    case.check()
                    log(f"ok      {case.kernel:32s} {size:19s} {dname}")
                except AssertionError as error:
                    failed += 1
                    log(f"FAILED  {case.kernel:32s} {size:19s} {dname}: {error}")
                del case
                gc.collect()
    log(f"{failed} case(s) disagree with the PyTorch reference" if failed else "every case matches the reference")
    return 1 if failed else 0


def measure_all(sizes: list[str], s: Settings, flush_bytes: int,
                log: Callable[[str], None]) -> tuple[list[Row], dict[str, str]]:
    """Every case validated, then timed (re-measured while other processes disturb it)."""
    retry_left = MAX_TOTAL_RETRIES
    rows: list[Row] = []
    models: dict[str, str] = {}
    for size in sizes:
        shape = SIZES[size]
        for dname, dtype in DTYPES.items():
            for builder, kw, target in cases.ALL_BUILDERS:
                probe = builder(shape, dtype, 1, **kw)
                nsets = 1 if size != LARGE else max(2, math.ceil(flush_bytes / probe.set_bytes))
                case = contenders.attach(probe if nsets == 1 else builder(shape, dtype, nsets, **kw))
                del probe
                try:
                    case.check()
                except AssertionError as error:
                    raise ValidationFailed(f"{size} {dname}: {error}") from None
                models[case.kernel] = case.model
                for attempt in range(MAX_RETRIES + 1):
                    with Disturbance() as dist:
                        t = measure_case(case.impls, s)
                    if dist.fraction <= DISTURBED or attempt == MAX_RETRIES or retry_left <= 0:
                        break
                    log(f"  {case.kernel} {size} {dname}: other processes used {dist.fraction * 100:.0f}% of the "
                        "CPUs, measuring again")
                    retry_left -= 1
                    waited = wait_quiet(QUIET_WAIT)
                    log(f"  waited {waited:.1f} s for the other processes")
                c_t = t["c"]
                assert c_t is not None
                row = Row(case.kernel, size.split()[0], dname, case.nbytes, math.prod(shape), nsets,
                          nsets * case.set_bytes, c_t, t.get("c_np"), t.get("torch"), t.get("numpy"), target,
                          dist.fraction, {k: t[k] for k in contenders.CONTENDERS if t.get(k) is not None})
                rows.append(row)
                others = " ".join(f"{k}={_ms(v)}" for k, v in row.others.items() if k != "torch")
                log(f"{case.kernel:32s} {size:19s} {dname:4s} sets={nsets:2d} c={c_t.median * 1e3:8.3f} "
                    f"c_np={_ms(row.c_np):>8s} torch={_ms(row.torch):>8s} numpy={_ms(row.numpy):>8s} {others} ms "
                    f"{_gbs(row):5.1f} GB/s busy={dist.fraction * 100:.0f}%")
                del case, t
                gc.collect()
    return rows, models


KEPT = [("<!-- e2e -->", "<!-- /e2e -->")]  # sections other scripts write into the same file (bench/e2e.py)


def kept_sections(path: Path) -> str:
    """The blocks of `path` that other scripts own (between their markers), to append after the kernel report."""
    old = path.read_text() if path.exists() else ""
    out = ""
    for begin, end in KEPT:
        i, j = old.find(begin), old.find(end)
        if 0 <= i < j:
            out += "\n" + old[i:j + len(end)] + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test, not real numbers")
    parser.add_argument("--size", choices=list(SIZE_CHOICES), default="all", help="which sizes to run (all)")
    parser.add_argument("--check", action="store_true",
                        help="only validate every case against the PyTorch reference backend; time nothing")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report to this file")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    sizes = SIZE_CHOICES[args.size]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = _core.threads()
    torch.set_num_threads(threads)
    if args.check:
        return check_all(sizes, log)
    cache = caches()
    llc = max(cache.values()) if cache else 32 * 2**20
    started = time.time()
    log(f"# diffinstruct benchmark: {threads} threads, LLC {_mb(llc)}, {'quick' if args.quick else 'full'} run")

    stream_n = STREAM_N if not args.quick else STREAM_N // 4
    wait_quiet(QUIET_WAIT)
    copy0, triad0 = stream_bandwidth(stream_n, s.stream_reps)
    log(f"STREAM before: copy {copy0:.1f} GB/s, triad {triad0:.1f} GB/s")
    sweep = [(n, *stream_bandwidth(n, 50)) for n in (8 * 4 * 64 * 64, 32 * 4 * 128 * 128)]

    tiny_t = [torch.zeros(4), torch.ones(4), torch.empty(4)]
    tiny_n = [t.numpy() for t in tiny_t]
    t_us = statistics.median(_time_calls([lambda: K.cfg_combine(tiny_t[0], tiny_t[1], 2.0, out=tiny_t[2])], 3000))
    n_us = statistics.median(_time_calls([lambda: K.cfg_combine(tiny_n[0], tiny_n[1], 2.0, out=tiny_n[2])], 3000))
    overhead = {"torch_us": t_us * 1e6, "numpy_us": n_us * 1e6, "per_tensor_us": (t_us - n_us) * 1e6 / 3}

    try:
        rows, models = measure_all(sizes, s, int(2.5 * llc), log)
    except ValidationFailed as error:
        log(f"validation failed, nothing more is timed: {error}")
        return 1

    wait_quiet(QUIET_WAIT)
    copy1, triad1 = stream_bandwidth(stream_n, s.stream_reps)
    log(f"STREAM after: copy {copy1:.1f} GB/s, triad {triad1:.1f} GB/s")
    sweep.append((stream_n, (copy0 + copy1) / 2, (triad0 + triad1) / 2))
    stream = {"n": stream_n, "copy0": copy0, "triad0": triad0, "copy1": copy1, "triad1": triad1,
              "copy": (copy0 + copy1) / 2, "triad": (triad0 + triad1) / 2}
    drift = max(abs(copy0 - copy1) / max(copy0, copy1), abs(triad0 - triad1) / max(triad0, triad1))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    mhz = cpu_mhz()
    busy = sum(r.disturbed > DISTURBED for r in rows)
    info = {
        "CPU": cpu_model() + (f", {mhz:.0f} MHz reported" if mhz else ""),
        "caches": ", ".join(f"L{lvl} {_mb(sz)}" for lvl, sz in sorted(cache.items())) + " (L1/L2 per core)",
        "threads": str(threads),
        "logical CPUs": str(os.cpu_count()),
        "OpenMP in the extension": "yes" if getattr(_core, "OPENMP", 0) else "no",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "run": f"{'quick' if args.quick else 'full'}, {time.time() - started:.0f} s, {busy} row(s) marked busy, "
               f"load average at the end {load[0]:.2f}" + ("" if args.size == "all" else f", sizes: {args.size} only"),
    }
    if drift > 0.10:
        info["warning"] = (f"STREAM before and after the kernels differ by {drift * 100:.0f}%: the machine was "
                           "probably busy; re-run on a quiet machine")
    text, summary = report(rows, info, stream, sweep, models, overhead, args.quick)
    print("\n".join(summary))
    if args.output is not None:
        args.output.write_text(text + kept_sections(args.output))
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
