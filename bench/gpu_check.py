"""`make gpu-check`: everything a machine with an NVIDIA GPU can check, in one command and one report.

Usage: python bench/gpu_check.py [--out gpu-check] [--quick] [--skip-build] [--budget-s 420] [--require-gpu]

Needs Python with PyTorch (CUDA build), NumPy, setuptools, pytest and diffusers, nvcc, and this repository;
no network. With a GPU (torch.cuda.is_available()):

1. Build: the C extension and libdipp_cuda.so for this device only (DIPP_CUDA=1, DIPP_CUDA_ARCHS = its compute
   capability, or the newest one nvcc has below it, plus PTX) into build/gpu_check/lib; every later step imports
   diffinstruct from there (PYTHONPATH), so the package in the source tree and any installed copy stay as they were.
2. Tests on the device: tests/test_cuda_parity.py and tests/test_cuda_build.py (CPU vs CUDA kernels, the
   library and its exports; the slow wheel builds left out), the CUDA cases of tests/ops (`-k cuda`), and a
   quick subset of the host-emulated CUDA suite (every launcher at one size; `make test` runs all of it).
3. Bandwidth (bench/gpu_check_timing.py): a device-to-device copy first, then every kernel of
   bench/bench_cases.py, validated against the PyTorch reference and timed, as GB/s and a fraction of the copy.
4. DI++ iterations of an SD1.5-architecture UNet with random weights, bf16, shared and full mode, batch 1/4/8,
   64x64 latents: seconds per iteration, peak torch.cuda.max_memory_allocated; an out-of-memory row is reported.

About 4 minutes on an H100/H200-class GPU; steps start only while the --budget-s (default 420 s) lasts.

Without a GPU it says so, and runs what the CPUs can: the build (C extension only), the whole host-emulated CUDA
suite (tests/test_cuda_emu_parity.py, test_host_emu.py, test_cuda_emu_binding.py), and the timing code at smoke
sizes on the CPU with a tiny UNet (a check that the code runs, not a measurement). --quick: the emulated suite's
quick subset and fewer repetitions (what tests/test_gpu_check.py runs).

Writes OUT/report.md and OUT/report.json (plus build.log, the pytest logs and junit files, timing.json).
Exit status: 0 when every part that could run here passed (the report's status is "pass" with a GPU, "no-gpu"
without one), 1 when a part failed (build, a test, a kernel that disagrees with the reference, the timing child),
3 with --require-gpu when no GPU is present. A DI++ row that runs out of memory is reported, not a failure.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "gpu_check"
NO_GPU, PASS, FAIL = "no-gpu", "pass", "fail"
EMU_FILES = ["test_cuda_emu_parity.py", "test_host_emu.py", "test_cuda_emu_binding.py"]
# the quick run: every launcher at one odd size (4 chunks + a partial warp row) and the list kernels, release build
EMU_QUICK = ["test_cuda_emu_parity.py", "-k", "t256-3x4884 or t256-f32"]
# (name, pytest arguments, whether a skip counts as a failure: every test of the group skips only without a usable
# GPU and CUDA library; test_cuda_build also skips its architecture list check, which DIPP_CUDA_ARCHS chose);
# run from tests/ on a GPU only
DEVICE_GROUPS = [
    ("CPU vs CUDA parity on the device", ["test_cuda_parity.py"], True),
    ("CUDA library: build, exports, loading", ["test_cuda_build.py", "-m", "not slow"], False),
    ("ops tests, CUDA cases", ["ops", "-k", "cuda"], True),
]


# ---------------------------------------------------------------------------------------------- the machine


def find_nvcc() -> str | None:
    """What setup.py finds: $NVCC when set, else nvcc on PATH, else /usr/local/cuda/bin/nvcc."""
    explicit = os.environ.get("NVCC")
    for candidate in (explicit,) if explicit else (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_info() -> dict[str, Any]:
    nvcc = find_nvcc()
    if nvcc is None:
        return {"path": None}
    info: dict[str, Any] = {"path": nvcc}
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        info["version"] = (re.findall(r"release [\d.]+, V[\d.]+", version) or [version.strip()[-80:]])[0]
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
        info["archs"] = sorted(set(re.findall(r"compute_(\d+)\b", listed)), key=int)
    except (OSError, subprocess.SubprocessError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def missing_modules() -> list[str]:
    """What the steps import and an offline machine cannot fetch: setup.py (numpy, setuptools), the tests (pytest),
    the DI++ rows (diffusers)."""
    return [name for name in ("numpy", "setuptools", "pytest", "diffusers") if importlib.util.find_spec(name) is None]


def probe() -> dict[str, Any]:
    """Python, PyTorch and the GPU as PyTorch sees it (no CUDA context is created)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "nvcc": nvcc_info(), "missing": missing_modules()}
    try:
        import torch
    except ImportError as exc:
        info.update(torch=None, gpu=False, why_no_gpu=f"PyTorch is not importable ({exc})")
        return info
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if not info["gpu"]:
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        info["why_no_gpu"] = f"torch.cuda.is_available() is False; torch {torch.__version__} is {built}"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(device_count=torch.cuda.device_count(), device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=props.total_memory / 1024**3, multiprocessors=props.multi_processor_count)
    return info


def device_arch(capability: str, supported: list[str] | None) -> str:
    """The SM number to build for: the device's own when nvcc knows it, else the newest nvcc has below it (its
    PTX, which setup.py always adds, is then compiled for the device by the driver)."""
    want = capability.replace(".", "")
    if not supported or want in supported:
        return want
    below = [a for a in supported if int(a) <= int(want)]
    return max(below, key=int) if below else want


# ---------------------------------------------------------------------------------------------- build


def build(arch: str | None, log: Path, timeout: float) -> dict[str, Any]:
    """setup.py build into build/gpu_check/lib: CUDA for `arch` only, or no CUDA (arch None). A lock keeps two
    runs (a test and a manual run) from writing the same files at once."""
    env = dict(os.environ, DIPP_CUDA="1" if arch else "0")
    if arch:
        env["DIPP_CUDA_ARCHS"] = arch
    else:
        env.pop("DIPP_CUDA_ARCHS", None)
    lib = BUILD / "lib"
    cmd = [sys.executable, "setup.py", "-q", "build", "--build-base", str(BUILD / "setup"), "--build-lib", str(lib),
           "--parallel", str(os.cpu_count() or 1)]
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "env": {k: env[k] for k in ("DIPP_CUDA", "DIPP_CUDA_ARCHS")
                                                                    if k in env}, "lib": str(lib)}
    BUILD.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(BUILD / ".lock", "w") as lock, open(log, "w") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            result["ok"] = proc.returncode == 0
            result["error"] = None if result["ok"] else f"exit status {proc.returncode} (see {log.name})"
        except subprocess.TimeoutExpired:
            result.update(ok=False, error=f"over {timeout:.0f} s")
    result["seconds"] = time.perf_counter() - t0
    package = lib / "diffinstruct"
    if result["ok"] and not list(package.glob("_core*.so")):
        result.update(ok=False, error="no diffinstruct/_core*.so in the build")
    cuda_lib = package / "libdipp_cuda.so"
    if arch and result["ok"] and not cuda_lib.exists():
        result.update(ok=False, error="no libdipp_cuda.so in the build")
    if arch and cuda_lib.exists():
        result["cuda_library_mb"] = cuda_lib.stat().st_size / 1e6
    return result


# ---------------------------------------------------------------------------------------------- tests


def junit_counts(xml: Path) -> dict[str, Any]:
    """Passed / failed / skipped counts of a pytest junit file, the first failures and the skip reasons."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    reasons: Counter[str] = Counter()
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            if len(counts["failures"]) < 10:
                counts["failures"].append(f"{name}: {(bad.get('message') or '').splitlines()[0][:200]}"
                                          if bad.get("message") else name)
        elif skipped is not None:
            counts["skipped"] += 1
            reasons[(skipped.get("message") or "")[:200]] += 1
        else:
            counts["passed"] += 1
    counts["skip_reasons"] = [f"{n} x {reason}" for reason, n in reasons.most_common(5)]
    return counts


def run_pytest(name: str, args: list[str], env: dict[str, str], out: Path, timeout: float,
               skips_fail: bool = False) -> dict[str, Any]:
    slug = re.sub(r"\W+", "_", name.lower()).strip("_")
    xml, log = out / f"pytest_{slug}.xml", out / f"pytest_{slug}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    result: dict[str, Any] = {"name": name, "command": "pytest " + " ".join(args), "log": log.name}
    if importlib.util.find_spec("pytest") is None:
        return {**result, "seconds": 0.0, "ok": False, "error": "not run: pytest is not installed"}
    t0 = time.perf_counter()
    xml.unlink(missing_ok=True)
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT / "tests", env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            result["exit"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["exit"] = None
            result["error"] = f"over {timeout:.0f} s"
    result["seconds"] = time.perf_counter() - t0
    if xml.exists():
        result.update(junit_counts(xml))
    elif "error" not in result:
        result["error"] = f"pytest wrote no results (exit status {result['exit']}; see {log.name})"
    result["ok"] = ("error" not in result and result.get("exit") in (0, 5) and result.get("failed", 1) == 0
                    and not (skips_fail and result.get("skipped")))
    if skips_fail and result.get("skipped"):
        result["error"] = "tests skipped on a GPU machine: the CUDA library did not load (see the skip reasons)"
    return result


# ---------------------------------------------------------------------------------------------- timing


def run_timing(device: str, out: Path, env: dict[str, str], quick: bool, budget_s: float) -> dict[str, Any]:
    """bench/gpu_check_timing.py in its own process: a kernel that crashes it leaves the other steps' results."""
    result_file = out / "timing.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check_timing.py"), "--device", device, "--out", str(result_file),
           "--budget-s", str(max(30.0, budget_s))]
    if quick:
        cmd.append("--quick")
    if device == "cpu":  # a smoke on a shared machine: one thread is the quickest
        env = dict(env, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    error = None
    with open(out / "timing.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(30.0, budget_s) + 60)
            if proc.returncode != 0:
                error = f"exit status {proc.returncode} (see timing.log)"
        except subprocess.TimeoutExpired:
            error = "killed: over its time limit (see timing.log)"
    result: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    result["seconds"] = time.perf_counter() - t0
    if error or not result.get("done"):
        result["error"] = error or "the timing child did not finish (see timing.log)"
    return result


# ---------------------------------------------------------------------------------------------- main


def child_env(overlay: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if overlay is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(overlay), env.get("PYTHONPATH")]))
    env.pop("DIPP_CUDA_LIBRARY", None)  # the library under test is the one next to the built extension
    return env


def failed_parts(report: dict[str, Any]) -> list[str]:
    """The parts that failed. A case or row left out for the time budget and an out-of-memory row are reported
    but are no failure; a DI++ row failing otherwise is (a bug on the engine's CUDA path)."""
    failed = [] if report["build"] is None or report["build"].get("ok") else ["build"]
    failed += [f"tests: {t['name']}" for t in report["tests"] if not t["ok"]]
    timing = report["timing"] or {}
    failed += [f"kernel {k['kernel']} ({k['size']}, {k['dtype']})" for k in timing.get("kernels", [])
               if "error" in k and not k["error"].startswith("not run")]
    failed += [f"DI++ {r['mode']} batch {r['batch']}: {r['error'][:120]}" for r in timing.get("unet", [])
               if "error" in r and not r["error"].startswith(("not run", "out of memory"))]
    if "error" in timing:
        failed.append(f"timing: {timing['error']}")
    return failed


def status_of(report: dict[str, Any]) -> str:
    if report["failed"]:
        return FAIL
    return PASS if report["machine"]["gpu"] else NO_GPU


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + args.budget_s
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "build": None,
                              "tests": [], "timing": None, "not_run": []}
    machine = report["machine"] = probe()
    gpu = machine["gpu"]
    found = (f"GPU {machine['device']} (compute capability {machine['capability']})" if gpu
             else f"NO GPU PRESENT: {machine['why_no_gpu']}; running the CPU-side parts only")
    print(f"gpu-check: {found}", flush=True)
    overlay = None
    if args.skip_build:
        report["not_run"].append("build (--skip-build: the importable diffinstruct is used)")
    else:
        arch = device_arch(machine["capability"], machine["nvcc"].get("archs")) if gpu else None
        what = f"sm_{arch}" if arch else "no CUDA: no GPU"
        print(f"gpu-check: building into {BUILD / 'lib'} ({what}) ...", flush=True)
        report["build"] = build(arch, args.out / "build.log", timeout=900)
        report["build"]["arch"] = arch
        overlay = BUILD / "lib" if report["build"]["ok"] else None
    env = child_env(overlay)
    if gpu:
        if report["build"] and report["build"]["ok"]:  # test_cuda_build then knows this build chose its architecture
            env["DIPP_CUDA_ARCHS"] = report["build"]["arch"]
        for name, pytest_args, skips_fail in DEVICE_GROUPS:
            print(f"gpu-check: tests: {name} ...", flush=True)
            report["tests"].append(run_pytest(name, pytest_args, env, args.out, 600, skips_fail))
    else:
        report["not_run"].append("the CUDA tests on the device (" + ", ".join(" ".join(g[1]) for g in DEVICE_GROUPS)
                                 + "): no GPU")
    print("gpu-check: tests: CUDA kernels on the CPU runtime (host emulation) ...", flush=True)
    # on a GPU machine the device time is better spent on the device: the emulated suite is CPU work that
    # `make test` runs in full, so only its quick subset runs there
    report["tests"].append(run_pytest("CUDA kernels on the CPU runtime (host emulation)",
                                      EMU_QUICK if args.quick or gpu else EMU_FILES, env, args.out, 900))
    remaining = deadline - time.monotonic()
    print(f"gpu-check: timing on {'cuda' if gpu else 'cpu (smoke)'} ({remaining:.0f} s left) ...", flush=True)
    report["timing"] = run_timing("cuda" if gpu else "cpu", args.out, env, args.quick, remaining - 20)
    if not gpu:
        report["not_run"].append("the device build, the kernel bandwidth on the device and the SD1.5 DI++ timings: "
                                 "no GPU (the timing code ran at smoke sizes on the CPU instead)")
    report["seconds"] = time.monotonic() - start
    report["failed"] = failed_parts(report)
    report["status"] = status_of(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="folder for report.md / report.json")
    parser.add_argument("--quick", action="store_true", help="a subset of the emulated suite, fewer repetitions")
    parser.add_argument("--skip-build", action="store_true", help="use the importable diffinstruct as it is")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no timing case or row starts after this")
    parser.add_argument("--require-gpu", action="store_true", help="exit 3 when no GPU is present")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_all(args)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = gpu_check_report.render(report)
    (args.out / "report.md").write_text(text)
    print("gpu-check: " + gpu_check_report.headline(report))
    print(f"gpu-check: wrote {args.out / 'report.md'} and report.json in {report['seconds']:.0f} s")
    if report["status"] == FAIL:
        return 1
    if report["status"] == NO_GPU and args.require_gpu:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
