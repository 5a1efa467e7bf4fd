"""The binding must not leak: references, DLPack capsules or memory, on success and on error.

10_000 successful calls (2_500 each of generator_grad over torch tensors via DLPack,
ta_loss over NumPy arrays, add_noise, adam_step over lists) and 1_000 failing calls,
with the process RSS and the reference count of every input object checked.
For torch tensors the C++ use count of the TensorImpl is checked too: every
DLPack capsule the binding consumes holds one reference until its deleter runs,
so a capsule that is never handed back shows up exactly, not just as RSS.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffinstruct import _core

RSS_LIMIT = 8 * 2**20
B, N = 2, 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def refcounts(objs: list[Any]) -> list[tuple[int, int]]:
    """Python reference counts, and for torch tensors the TensorImpl use count (DLPack holders)."""
    return [(sys.getrefcount(o), o._use_count() if isinstance(o, torch.Tensor) else 0) for o in objs]


def flatten(args: dict[str, Any]) -> list[Any]:
    """Every object handed to the binding, list items included."""
    out = []
    for value in args.values():
        if isinstance(value, list):
            out.append(value)
            out.extend(value)
        elif isinstance(value, (np.ndarray, torch.Tensor)):
            out.append(value)
    return out


def torch_in(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g) + 0.5


def success_calls() -> list[tuple[Callable[..., Any], dict[str, Any]]]:
    rng = np.random.default_rng(0)
    gen = {
        "x0": torch_in(1),
        "d_ta": torch_in(2),
        "d_cond": torch_in(3),
        "grad_out": torch.empty(B, N),
        "weight_out": torch.empty(B),
        "ref_dist_out": torch.empty(B),
        "gap_out": torch.empty(B),
        "surrogate_out": torch.empty(B),
        "nonfinite_out": torch.empty(B, dtype=torch.int64),
        "d_uncond": torch_in(4),
        "omega": 3.0,
        "dr": torch_in(5),
        "alpha": 0.1,
    }
    ta = {
        "d_ta": rng.standard_normal((B, 96)).astype(np.float32),
        "x0": rng.standard_normal((B, 96)).astype(np.float32),
        "loss_out": np.empty(B, np.float32),
        "sigma": np.array([0.5, 3.0], np.float32),
        "grad_out": np.empty((B, 96), np.float32),
        "nonfinite_out": np.empty(B, np.int64),
    }
    noise = {
        "x0": rng.standard_normal((B, 96)).astype(np.float32),
        "sigma": np.array([0.5, 3.0], np.float32),
        "xt_out": np.empty((B, 96), np.float32),
        "seed": 7,
        "offset": 0,
        "eps_out": np.empty((B, 96), np.float32),
    }
    adam = {
        "params": [torch.rand(4, 8), np.ones(33, np.float32)],
        "grads": [torch.rand(4, 8), np.full(33, 0.1, np.float32)],
        "exp_avgs": [np.zeros((4, 8), np.float32), torch.zeros(33)],
        "exp_avg_sqs": [np.zeros((4, 8), np.float32), torch.zeros(33)],
        "lr": 1e-4,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "step": 1,
        "decoupled": True,
    }
    return [
        (_core.generator_grad, gen),
        (_core.ta_loss, ta),
        (_core.add_noise, noise),
        (_core.adam_step, adam),
    ]


class RaisingProducer:
    """A DLPack producer whose __dlpack__ raises (the binding wraps and chains the error)."""

    def __dlpack__(self, **kwargs):
        raise RuntimeError("no export today")

    def __dlpack_device__(self):
        return (1, 0)


def failing_calls() -> list[tuple[Callable[..., Any], dict[str, Any], type[BaseException]]]:
    calls = []
    # bad dtype after several torch capsules were taken: every one must be handed back
    gen = success_calls()[0][1]
    gen["dr"] = torch.ones(B, N, dtype=torch.float64)
    calls.append((_core.generator_grad, gen, TypeError))
    # bad dtype on a NumPy input after a first view
    ta = success_calls()[1][1]
    ta["x0"] = ta["x0"].astype(np.float64)
    calls.append((_core.ta_loss, ta, TypeError))
    # bad sigma value, and an int32 output
    noise = success_calls()[2][1]
    noise["eps_out"] = np.empty(noise["x0"].shape, np.int32)
    calls.append((_core.add_noise, noise, TypeError))
    # a list whose last item has a bad dtype (three views taken before it)
    adam = success_calls()[3][1]
    adam["exp_avg_sqs"] = [adam["exp_avg_sqs"][0], torch.zeros(33, dtype=torch.float64)]
    calls.append((_core.adam_step, adam, TypeError))
    # a producer that raises
    calls.append((_core.fill_uniform, {"out": RaisingProducer(), "seed": 1}, BufferError))
    return calls


def run_success(calls, repeat: int) -> None:
    for fn, kwargs in calls:
        for _ in range(repeat):
            fn(**kwargs)


def run_failing(calls, repeat: int) -> None:
    for fn, kwargs, exc in calls:
        for _ in range(repeat):
            try:
                fn(**kwargs)
            except exc:
                pass
            else:  # pragma: no cover - the call must fail
                raise AssertionError(f"{fn.__name__} accepted bad input")


def test_successful_calls_do_not_leak():
    calls = success_calls()
    objs = [o for _, kwargs in calls for o in flatten(kwargs)]
    run_success(calls, 200)  # warm-up: thread pool, allocator caches, lazy imports
    gc.collect()
    before_refs = refcounts(objs)
    before_rss = rss_bytes()
    run_success(calls, 2_500)  # 10_000 calls in all
    gc.collect()
    grown = rss_bytes() - before_rss
    assert refcounts(objs) == before_refs
    assert grown < RSS_LIMIT, f"RSS grew by {grown / 2**20:.1f} MiB over 10_000 calls"
    assert all(np.isfinite(np.asarray(kwargs["loss_out"])).all() for fn, kwargs in calls if fn is _core.ta_loss)


def test_failing_calls_do_not_leak():
    calls = failing_calls()
    objs = [o for _, kwargs, _ in calls for o in flatten(kwargs)] + [kwargs["out"] for fn, kwargs, _ in calls[-1:]]
    run_failing(calls, 20)
    gc.collect()
    before_refs = refcounts(objs)
    before_rss = rss_bytes()
    run_failing(calls, 200)  # 1_000 failing calls
    gc.collect()
    grown = rss_bytes() - before_rss
    assert refcounts(objs) == before_refs
    assert grown < RSS_LIMIT, f"RSS grew by {grown / 2**20:.1f} MiB over 1_000 failing calls"


@pytest.mark.parametrize("which", ["success", "failure"])
def test_python_heap_is_stable(which):
    """tracemalloc sees the binding's PyMem allocations (views, lists): none may survive a call."""
    if which == "success":
        calls = success_calls()

        def run(n: int) -> None:
            run_success(calls, n)
    else:
        failing = failing_calls()

        def run(n: int) -> None:
            run_failing(failing, n)

    run(20)
    gc.collect()
    tracemalloc.start()
    try:
        run(5)
        gc.collect()
        first = tracemalloc.take_snapshot()
        run(200)
        gc.collect()
        second = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in second.compare_to(first, "filename"))
    assert growth < 64 * 1024, f"Python heap grew by {growth} bytes over 200 rounds of calls"
