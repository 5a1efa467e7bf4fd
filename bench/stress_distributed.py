"""Stress the end of a 2-process torchrun training: does every completed run exit 0?

Usage: python bench/stress_distributed.py [--runs 30] [--load 1] [--resume] [--timeout 180] [--max-seconds S]
                                          [--keep-logs DIR] [--stop-on-failure]

Each run launches, as tests/test_distributed.py::test_cli_train_and_resume_under_torchrun does,
`python -m torch.distributed.run --nproc_per_node 2 -m diffinstruct train --config run.toml --no-progress` on the
same toy config (4 steps, gloo on the CPU) in a fresh directory, with --resume also the second launch that resumes
to 6 steps. Meanwhile `--load` busy-loop processes keep the CPUs occupied: the shutdown race this hunts (a rank
aborting with "terminate called without an active exception" after the summary was printed) showed up only under
load, because the scheduling delay between the two ranks' teardowns is what opens it.

A run is clean when torchrun exits 0, its stderr holds no "terminate called" and no worker failure, and stdout is
exactly one JSON summary with the expected step count. With --keep-logs, an unclean run's log and any core files
its ranks left (when `ulimit -c` allows them; run with PYTHONFAULTHANDLER=1 for the Python stacks) are kept.
Prints one line per run and, at the end, clean/total and the wall time; exits 1 when any run was not clean.
Not part of `make test` (it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_distributed import CONFIG, WORLD  # noqa: E402  (the test's own run, so both exercise the same thing)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "diffinstruct", "train", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        def text(b: bytes | str | None) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return -999, text(exc.stdout), text(exc.stderr) + f"\n[stress] timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def verdict(rc: int, stdout: str, stderr: str, completed: int) -> str:
    """'clean', or a short reason."""
    if "terminate called" in stderr:
        return "terminate-called"
    if rc == -999:
        return "timeout"
    if rc != 0:
        return f"rc={rc}"
    if "ChildFailedError" in stderr or "FAILED" in stderr:
        return "worker-failed"
    try:
        summary = json.loads(stdout)
    except ValueError:
        return "bad-summary"
    return "clean" if summary.get("completed") == completed else "wrong-steps"


def one_run(i: int, base: Path, do_resume: bool, timeout: float) -> tuple[str, str, list[Path]]:
    """Returns (verdict, the first unclean launch's log, the core files in its directory)."""
    work = base / f"run{i:03d}"
    work.mkdir()
    out = work / "run"
    config = work / "run.toml"
    config.write_text(CONFIG.replace("{out}", str(out)))
    launches = [(["--config", str(config), "--no-progress"], 4)]
    if do_resume:
        launches.append((["--config", str(config), "--no-progress", "--resume", "--steps", "6"], 6))
    for args, completed in launches:
        rc, stdout, stderr = launch(args, work, timeout)
        v = verdict(rc, stdout, stderr, completed)
        if v != "clean":
            log = f"$ torchrun ... {' '.join(args)}\nexit {rc}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            return v, log, sorted(work.glob("core*"))
    return "clean", "", []


def start_load(n: int) -> list[subprocess.Popen[bytes]]:
    # plain busy loops: they compete for the cores with the two ranks, as other jobs did when the test failed
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="torchrun trainings (default 30)")
    parser.add_argument("--load", type=int, default=1, help="busy-loop processes alongside (default 1)")
    parser.add_argument("--resume", action="store_true", help="each run also resumes to 6 steps, as the test does")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per launch before it counts as hung")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop starting runs after this long")
    parser.add_argument("--keep-logs", type=Path, default=None, help="write each unclean run's log (and cores) here")
    parser.add_argument("--stop-on-failure", action="store_true", help="stop at the first unclean run")
    args = parser.parse_args()

    counts: Counter[str] = Counter()
    began = time.monotonic()
    load = start_load(args.load)
    try:
        with tempfile.TemporaryDirectory(prefix="stress-dist-") as tmp:
            for i in range(args.runs):
                if args.max_seconds is not None and time.monotonic() - began > args.max_seconds:
                    print(f"stopping after {i} runs (--max-seconds {args.max_seconds:g})", flush=True)
                    break
                t0 = time.monotonic()
                v, log, cores = one_run(i, Path(tmp), args.resume, args.timeout)
                counts[v] += 1
                print(f"run {i + 1:3d}/{args.runs}: {v:16s} {time.monotonic() - t0:6.1f} s", flush=True)
                if log:
                    tail = "\n".join(log.splitlines()[-15:])
                    print(tail, flush=True)
                    if args.keep_logs is not None:
                        args.keep_logs.mkdir(parents=True, exist_ok=True)
                        (args.keep_logs / f"run{i + 1:03d}-{v}.log").write_text(log)
                        for core in cores:
                            shutil.move(core, args.keep_logs / f"run{i + 1:03d}-{core.name}")
                    if args.stop_on_failure:
                        break
    finally:
        stop_load(load)
    total = sum(counts.values())
    wall = time.monotonic() - began
    others = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()) if k != "clean")
    print(f"clean runs: {counts['clean']}/{total}" + (f" ({others})" if others else "")
          + f"; wall {wall:.0f} s ({wall / max(total, 1):.1f} s per run), load {args.load} busy process(es), "
          f"{os.cpu_count()} CPUs")
    return 0 if counts["clean"] == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
