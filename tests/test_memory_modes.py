"""Peak memory of one DI++ iteration, full vs shared LoRA, on a small UNet (bench/memory.py, fresh subprocesses).

The SD1.5-size measurement is bench only (`python bench/memory.py`, minutes and ~21 GiB); this runs the same
code path on a small UNet of the same family, where weights and optimiser state still dominate.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import memory  # noqa: E402


@pytest.fixture(scope="module")
def results():
    # Both modes at once, each in its own process with one thread (peak RSS is per process, and on a shared
    # 2-core machine OpenMP threads that wait on each other slow down badly); timings are not checked here.
    with ThreadPoolExecutor(len(memory.MODES)) as pool:
        futures = {mode: pool.submit(memory.measure, mode, size="small", dtype="float32", steps=1, rank=16,
                                     threads=1, timeout=120) for mode in memory.MODES}
        return {mode: f.result() for mode, f in futures.items()}


@pytest.mark.parametrize("mode", memory.MODES)
def test_each_mode_runs_a_finite_iteration(results, mode):
    r = results[mode]
    assert not r.get("error"), r.get("error")
    (it,) = r["iterations"]
    assert it["finite"] and it["ta_ok"] == 1.0 and it["generator_ok"] == 1.0
    assert it["peak_mib"] > 0 and math.isfinite(it["time_total"]) and 0 <= it["time_kernels"] <= it["time_total"]


def test_shared_mode_needs_at_most_45_percent_of_full(results):
    full, shared = results["full"]["iterations"][0], results["shared"]["iterations"][0]
    ratio = shared["peak_mib"] / full["peak_mib"]
    assert ratio <= memory.TARGET_RATIO, f"shared {shared['peak_mib']:.0f} MiB / full {full['peak_mib']:.0f} MiB"
    # shared trains adapters only: far fewer trainable parameters than full mode
    assert results["shared"]["generator_trainable"] < 0.2 * results["full"]["generator_trainable"]


def test_report_table(results):
    text = memory.report(results, "small", "float32", "test", results["full"]["params"],
                         memory.mem_available(), 16, {})
    assert "| full |" in text and "| shared |" in text and "shared / full peak" in text


def test_dtype_choice_falls_back_to_bf16_when_full_float32_cannot_fit():
    params = memory.parameter_count("small")
    need32 = memory.projected_peak("full", params, 4)
    assert memory.choose_dtype("small", "auto", need32 + memory.RESERVE)[0] == "float32"
    dtype, reason, _ = memory.choose_dtype("small", "auto", need32 + memory.RESERVE - 1)
    assert dtype == "bfloat16" and "MemAvailable" in reason
    assert memory.projected_peak("full", params, 2) < need32
