"""`make gpu-check` (bench/gpu_check.py) where no GPU is visible: it says so, runs the CPU-side parts and exits 0.

The GPU half cannot run here; its report is rendered from a made-up GPU result instead, so that what it
writes (and what counts as a failure: not an out-of-memory row) is checked all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402


@pytest.fixture(scope="module")
def no_gpu_run(tmp_path_factory):
    """The quick no-GPU run, with any GPU hidden (the build step has its own test below)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick", "--skip-build",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    return proc, out


EMU = "tests: CUDA kernels on the CPU runtime (host emulation)"


def test_no_gpu_run_says_so_and_exits_0(no_gpu_run):
    proc, out = no_gpu_run
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["gpu"] is False
    assert "NO GPU PRESENT" in proc.stdout and "torch.cuda.is_available() is False" in proc.stdout
    text = (out / "report.md").read_text()
    assert "Not run here" in text and "the CUDA tests on the device" in text
    # the emulated parity suite has its own test file; when it fails, gpu-check must say so (exit 1), and that
    # is the only failure this run may have
    if report["failed"]:
        assert report["failed"] == [EMU] and report["status"] == "fail" and proc.returncode == 1, report["failed"]
        assert text.startswith("# GPU check\n\n**Status: FAIL, NO GPU PRESENT.**")
    else:
        assert report["status"] == "no-gpu" and proc.returncode == 0, proc.stdout + proc.stderr
        assert text.startswith("# GPU check\n\n**Status: NO GPU PRESENT.**")


def test_no_gpu_run_ran_the_cpu_side_parts(no_gpu_run):
    _, out = no_gpu_run
    report = json.loads((out / "report.json").read_text())
    (emu,) = report["tests"]
    assert "host emulation" in emu["name"] and emu["passed"] >= 10  # it ran (a broken environment passes none)
    timing = report["timing"]
    assert timing["done"] and timing["device"] == "cpu" and timing["copy"]["gbs"] > 0
    kernels = timing["kernels"]
    assert len(kernels) == 20 and all(k.get("checked") and k["gbs"] > 0 for k in kernels), kernels
    assert {(r["mode"], r["batch"]) for r in timing["unet"]} == {("shared", 1), ("shared", 2), ("full", 1), ("full", 2)}
    assert all(r["finite"] and r["s_per_it"] > 0 and "error" not in r for r in timing["unet"]), timing["unet"]
    text = (out / "report.md").read_text()
    assert "CPU smoke" in text and "| shared | 1 |" in text and "| full | 2 |" in text


def gpu_report() -> dict:
    """A report as a GPU run would leave it: a passing build and tests, two kernels, an out-of-memory row."""
    kernel = {"size": "large 64x4x256x256", "dtype": "f32", "kernel": "cfg_combine", "model": "R uncond, cond, W out: "
              "3*n*s", "median_s": 2e-4, "min_s": 1.9e-4, "reps": 100, "nbytes": 8e8, "gbs": 4000.0, "of_copy": 0.9,
              "checked": True}
    rows = [{"mode": "shared", "batch": 1, "model": "SD1.5 UNet", "dtype": "bf16", "s_per_it": 0.21, "min_s": 0.2,
             "timed": 3, "warmup": 2, "finite": True, "peak_gib": 6.5, "built_gib": 3.4, "generator_trainable": 2.5e7,
             "params": 8.6e8},
            {"mode": "full", "batch": 8, "model": "SD1.5 UNet", "dtype": "bf16", "peak_gib": 79.0,
             "error": "out of memory: OutOfMemoryError: CUDA out of memory"}]
    return {"date": "today", "quick": False, "seconds": 200.0, "not_run": [],
            "machine": {"gpu": True, "device": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                        "multiprocessors": 132, "device_count": 1, "python": "3.11", "platform": "Linux", "cpus": 16,
                        "torch": "2.13.0+cu130", "torch_cuda": "13.0", "nvcc": {"path": "/usr/local/cuda/bin/nvcc",
                                                                                   "version": "release 13.0",
                                                                                   "archs": ["80", "90"]}},
            "build": {"ok": True, "error": None, "arch": "90", "seconds": 40.0, "lib": "build/gpu_check/lib",
                      "cuda_library_mb": 0.9, "command": "setup.py build", "env": {"DIPP_CUDA": "1",
                                                                                   "DIPP_CUDA_ARCHS": "90"}},
            "tests": [{"name": "CPU vs CUDA parity on the device", "command": "pytest test_cuda_parity.py", "ok": True,
                       "passed": 8, "failed": 0, "skipped": 0, "seconds": 9.0}],
            "timing": {"device": "cuda", "done": True, "copy": {"bytes": 2**31, "gbs": 4400.0, "best_gbs": 4500.0},
                       "kernels": [kernel, {**kernel, "kernel": "huber_terms",
                                            "error": "not run: over the time budget"}],
                       "unet": rows}}


def test_gpu_report_renders_and_an_out_of_memory_row_is_no_failure():
    report = gpu_report()
    report["failed"] = gpu_check.failed_parts(report)
    assert report["failed"] == [] and gpu_check.status_of(report) == "pass"
    report["status"] = "pass"
    text = gpu_check_report.render(report)
    assert "**Status: PASS.** NVIDIA H200 (compute capability 9.0)." in text
    assert "| large 64x4x256x256 | f32 | cfg_combine | 0.2000 | 4000.0 | 90 % |" in text
    assert "| shared | 1 | 0.210 | 6.50 | 3.40 | 25.0M | yes |" in text
    assert "| full | 8 | — | 79.00 |" in text and "out of memory" in text
    assert "sm_90 + PTX" in text and "4400.0 GB/s" in text


def test_a_failing_test_kernel_or_row_fails_the_check():
    report = gpu_report()
    report["timing"]["kernels"][0]["error"] = "AssertionError: cfg_combine: output 0 differs"
    report["tests"][0].update(ok=False, failed=1)
    report["timing"]["unet"][0]["error"] = "RuntimeError: x0 is on cuda:0 but sigma is on cpu:0"
    report["failed"] = gpu_check.failed_parts(report)
    assert gpu_check.status_of(report) == "fail"
    assert report["failed"] == ["tests: CPU vs CUDA parity on the device",
                                "kernel cfg_combine (large 64x4x256x256, f32)",
                                "DI++ shared batch 1: RuntimeError: x0 is on cuda:0 but sigma is on cpu:0"]


def test_the_build_targets_the_device_or_the_newest_architecture_below_it():
    assert gpu_check.device_arch("9.0", ["75", "80", "90", "120"]) == "90"
    assert gpu_check.device_arch("12.1", ["80", "90", "120"]) == "120"  # its PTX runs on the newer device
    assert gpu_check.device_arch("8.6", None) == "86"


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom&#10;more"/></testcase>'
                   '<testcase classname="a" name="skip"><skipped message="no GPU"/></testcase>'
                   '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failures"] == ["a::bad: boom"] and counts["skip_reasons"] == ["1 x no GPU"]


@pytest.mark.slow
def test_build_step_without_cuda_gives_an_importable_extension(tmp_path):
    """The no-GPU build (C extension only) into build/gpu_check/lib, which later steps import first."""
    result = gpu_check.build(None, tmp_path / "build.log", timeout=600)
    assert result["ok"], (tmp_path / "build.log").read_text()[-2000:]
    env = gpu_check.child_env(Path(result["lib"]))
    code = "import diffinstruct._core as c, diffinstruct.kernels as k; print(c.__file__); print(k.backends() != {})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(Path(result["lib"]) / "diffinstruct" / Path(out.stdout.split()[0]).name),
                                       "True"]
