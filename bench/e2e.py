"""End to end: one DI++ iteration of ours against a peer's plain-PyTorch loop (bench/peer_loop.py), and our scaling.

Usage: python bench/e2e.py [--quick] [--part all|compare|scaling] [--output BENCHMARKS.md] [--json FILE]
       python bench/e2e.py --from-json FILE [FILE ...] [--output BENCHMARKS.md]   (render saved measurements)

compare: shared and full mode, float32 and bf16 autocast, on SD1.5's UNet cut to block_out_channels 64/128/256/256
(one layer per block, cross-attention dim 64, 77 tokens), latent 4x32x32, batch 2, omega 4.5, LoRA rank 8, one
thread. Every implementation of a configuration runs in its own process (bench/e2e_child.py); the parent steps them
in turn (ours, peer, ours' options and prototypes; the order rotates each round), so drifts of a shared machine hit
all alike, and each process's peak RSS is its own. Time: median over the repeats after warm-up, and the median of the
per-round ratios, in wall clock and in each process's CPU time (one thread: its work, without the time other
processes held the core; the targets are judged on it). Memory: peak RSS (VmHWM) minus the RSS after the imports, so
the models, optimiser states, EMA and activations count (torch's CPU allocator keeps no statistics and tracemalloc
does not see its tensors).
scaling: ours alone (shared, float32) over batch and latent size, each point in a fresh process, with the fits;
latent 128 is one profiled iteration without a warm-up (about two CPU-minutes here).

With --output the Markdown section replaces the block between `<!-- e2e -->` and `<!-- /e2e -->` in that file, or is
appended (bench/bench.py regenerates the file first under `make bench`). --quick runs a tiny UNet (a smoke test,
under two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from e2e_child import Spec  # noqa: E402
from e2e_report import Plan, Result, report  # noqa: E402
from memory import busy_seconds  # noqa: E402

BEGIN, END = "<!-- e2e -->", "<!-- /e2e -->"

# the engine options and prototypes measured beside ours in each configuration (mode, bf16) -> extra implementations
PROTOTYPE_ROWS: dict[tuple[str, bool], list[str]] = {
    ("shared", False): ["ours+onepass"],
    ("shared", True): ["ours+onepass"],
    ("full", False): ["ours+onepass"],
    ("full", True): ["ours+onepass"],
}
CONFIGS = [("shared", False), ("shared", True), ("full", False), ("full", True)]

FULL = Plan(warmup=1, repeats=4, batch=2, latent=32, tiny=False, configs=CONFIGS,
            scaling=[(1, 32, 3, 1), (2, 32, 3, 1), (4, 32, 2, 1), (8, 32, 1, 1), (1, 64, 0, 1), (1, 128, 0, 0)])
# the smoke test: one configuration per mode (each process costs seconds of imports)
QUICK = Plan(warmup=1, repeats=2, batch=2, latent=8, tiny=True, configs=[("shared", False), ("full", True)],
             scaling=[(1, 8, 1, 1), (2, 8, 1, 1), (1, 16, 0, 0)])


# ---------------------------------------------------------------------------------------------- children
def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Probe:
    """Other processes' share of the machine's CPU from now until others() (busy CPU time minus our children's)."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.busy, self.own, self.t0 = busy_seconds(), self._own(), time.perf_counter()

    def _own(self) -> float:
        return sum(cpu_seconds(c.proc.pid) for c in self.children)

    def others(self) -> float:
        wall = time.perf_counter() - self.t0
        own = self._own() - self.own
        return max(0.0, busy_seconds() - self.busy - own) / (wall * (os.cpu_count() or 1))


class Child:
    """One bench/e2e_child.py process; `ask` sends a command and returns the reply's record."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        env = dict(os.environ, OMP_NUM_THREADS="1")  # our C kernels' OpenMP too: one thread, like torch's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python_shim"), env.get("PYTHONPATH")]))
        self.log: TextIO = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "e2e_child.py"), json.dumps(asdict(spec))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=ROOT)
        self.ready: dict[str, Any] | None = None

    def read(self, tag: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-3:]
        raise RuntimeError(f"{self.spec.impl} ({self.spec.mode}) ended without {tag}: {' / '.join(tail)}")

    def ask(self, command: str, tag: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(tag)

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_interleaved(specs: list[Spec], warmup: int, repeats: int, profile: bool,
                    log: Any = print) -> tuple[dict[str, Result], float]:
    """Steps every spec's process in turn; returns the results by implementation and others' CPU share."""
    children = [Child(s) for s in specs]  # they build side by side; the timed steps never overlap
    results = {s.impl: Result(s.impl) for s in specs}
    share: list[float] = []
    try:
        for c in children:
            c.ready = c.read("READY")
        for r in range(warmup + repeats):
            order = children[r % len(children):] + children[:r % len(children)]
            probe = Probe(children)
            for c in order:
                rec = c.ask("step", "STEP")
                res = results[c.spec.impl]
                if r >= warmup:
                    res.seconds.append(rec["seconds"])
                    res.cpu.append(rec["cpu"])
                res.peak_mib, res.finite = rec["peak_mib"], res.finite and rec["finite"]
            share.append(probe.others())
            log("  round " + str(r + 1) + ": " + ", ".join(f"{c.spec.impl} {results[c.spec.impl].seconds[-1]:.2f} s"
                                                          for c in children if r >= warmup))
        if profile:
            probe = Probe(children)
            for c in children:
                res = results[c.spec.impl]
                res.profile = c.ask("profile", "PROFILE")
                if not repeats:  # a big point's only timed iteration is the profiled one (its overhead is small)
                    res.seconds, res.cpu = [res.profile["wall"]], [res.profile["cpu"]]
                    res.peak_mib = res.profile["peak_mib"]  # with the profiler's buffers: the report says how much
            if not repeats:
                share.append(probe.others())
    except RuntimeError as exc:
        for res in results.values():
            res.error = res.error or str(exc)
    finally:
        for c in children:
            c.close()
    return results, statistics.median(share) if share else float("nan")


# ---------------------------------------------------------------------------------------------- parts
def compare(plan: Plan, log: Any = print) -> list[dict[str, Any]]:
    rows = []
    for mode, bf16 in plan.configs:
        impls = ["ours", "peer", *PROTOTYPE_ROWS[(mode, bf16)]]
        log(f"{mode} {'bf16' if bf16 else 'fp32'}: {', '.join(impls)}")
        specs = [Spec(i, mode=mode, bf16=bf16, batch=plan.batch, latent=plan.latent, tiny=plan.tiny) for i in impls]
        results, share = run_interleaved(specs, plan.warmup, plan.repeats, plan.profile, log)
        rows.append({"mode": mode, "bf16": bf16, "results": results, "others": share})
    return rows


def scaling(plan: Plan, log: Any = print) -> list[dict[str, Any]]:
    points = []
    for batch, latent, repeats, warmup in plan.scaling:
        log(f"scaling: batch {batch}, latent {latent}, {warmup} warm-up, {repeats} repeat(s)")
        spec = Spec("ours", mode="shared", batch=batch, latent=latent, tiny=plan.tiny)
        # the big points time their profiled iteration (repeats = 0), the biggest without a warm-up
        results, share = run_interleaved([spec], warmup, repeats, plan.profile or not repeats, log)
        points.append({"batch": batch, "latent": latent, "repeats": repeats, "warmup": warmup,
                       "result": results["ours"], "others": share})
    return points


# ---------------------------------------------------------------------------------------------- output
def write_section(path: Path, section: str) -> None:
    """Replace the marked e2e block of `path` (or append it), leaving the rest of the file as it is."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    path.write_text(text)


def save(path: Path, rows: list[dict[str, Any]], points: list[dict[str, Any]], elapsed: float) -> None:
    def plain(item: dict[str, Any]) -> dict[str, Any]:
        return {k: ({i: asdict(r) for i, r in v.items()} if k == "results" else asdict(v) if k == "result" else v)
                for k, v in item.items()}

    path.write_text(json.dumps({"rows": [plain(r) for r in rows], "points": [plain(p) for p in points],
                                "elapsed": elapsed}, indent=1))


def load(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    data = json.loads(path.read_text())
    rows = [{**r, "results": {i: Result(**v) for i, v in r["results"].items()}} for r in data["rows"]]
    points = [{**p, "result": Result(**p["result"])} for p in data["points"]]
    return rows, points, data["elapsed"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny UNet, two repeats: a smoke test")
    parser.add_argument("--part", choices=("all", "compare", "scaling"), default="all")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step of each process")
    parser.add_argument("--output", type=Path, default=None, help="write the section into this Markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also save the measurements here")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="report saved measurements (several files: their rows and points together), run nothing")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.no_profile:
        plan.profile = False

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if args.from_json is not None:
        rows, points, elapsed = [], [], 0.0
        for path in args.from_json:
            more_rows, more_points, more_s = load(path)
            rows, points, elapsed = rows + more_rows, points + more_points, elapsed + more_s
    else:
        rows = compare(plan, log) if args.part in ("all", "compare") else []
        points = scaling(plan, log) if args.part in ("all", "scaling") else []
        elapsed = time.perf_counter() - t0
    if args.json is not None:
        save(args.json, rows, points, elapsed)
    text = report(rows, points, plan, elapsed, quick=args.quick)
    print(text)
    if args.output is not None:
        write_section(args.output, text)
        log(f"wrote the e2e section of {args.output}")
    failed = [r.error for row in rows for r in row["results"].values() if r.error]
    failed += [p["result"].error for p in points if p["result"].error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
