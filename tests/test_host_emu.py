"""The CPU runtime that runs cuda/*.cu in the tests (cuda/host_emu) keeps CUDA's semantics for the
subset the kernels use, and reports what a GPU would leave undefined instead of guessing."""

from __future__ import annotations

import ctypes
import os
import re
import time

import cuda_emu
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not cuda_emu.HAVE_GXX, reason="g++ is needed to build the CPU CUDA runtime")

# values of cuda_runtime.h's cudaError_t (the runtime uses CUDA's numbers)
SUCCESS, INVALID_VALUE, MEMORY, INVALID_CONFIGURATION, INVALID_HANDLE, LAUNCH_FAILURE = 0, 1, 2, 9, 400, 719


@pytest.fixture(scope="module")
def probes():
    path = cuda_emu.build_probes()
    lib = ctypes.CDLL(str(path))
    lib.probe_error_string.restype = ctypes.c_char_p
    lib.dipp_emu_last_message.restype = ctypes.c_char_p
    runtime = cuda_emu.Runtime(path)
    return lib, runtime


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def message(lib) -> str:
    return lib.dipp_emu_last_message().decode()


@pytest.mark.parametrize("grid, block", [((1, 1, 1), (1, 1, 1)), ((3, 2, 1), (64, 1, 1)), ((2, 3, 2), (8, 4, 2)),
                                         ((1, 1, 1), (1024, 1, 1)), ((5, 1, 1), (33, 1, 1))])
def test_every_thread_runs_once_with_its_indices(probes, grid, block):
    lib, _ = probes
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    out = np.full((blocks * threads, 12), 0xFFFFFFFF, np.uint32)
    assert lib.probe_ids(*grid, *block, ptr(out), None) == SUCCESS
    expected = [(tx, ty, tz, bx, by, bz, *block, *grid)
                for bz in range(grid[2]) for by in range(grid[1]) for bx in range(grid[0])
                for tz in range(block[2]) for ty in range(block[1]) for tx in range(block[0])]
    assert out.tolist() == [list(e) for e in expected]


def shfl_down_reference(values: np.ndarray, delta: np.ndarray, width: int) -> np.ndarray:
    """CUDA's __shfl_down_sync: lane l reads lane l + delta of its width-segment, else keeps its own value."""
    out = values.copy()
    for g in range(values.size):
        lane = g % 32
        if lane % width + delta[g] < width:
            out[g] = values[g + delta[g]]
    return out


@pytest.mark.parametrize("width", [32, 16, 8, 1])
def test_shfl_down_matches_cuda_semantics(probes, width):
    lib, _ = probes
    rng = np.random.default_rng(width)
    values = rng.standard_normal(128).astype(np.float32)
    for delta in (np.zeros(128, np.uint32), np.full(128, 1, np.uint32), np.full(128, 31, np.uint32),
                  np.full(128, 40, np.uint32), (np.arange(128) % 7).astype(np.uint32)):  # per-lane deltas
        out = np.zeros(128, np.float32)
        assert lib.probe_shfl(2, 64, ptr(values), ptr(delta), ptr(out), width, None) == SUCCESS
        assert np.array_equal(out, shfl_down_reference(values, delta, width)), (width, delta[:8])


def test_lanes_meet_at_every_shuffle(probes):
    """Writes before a shuffle are seen by every lane after it: the warp runs in lockstep."""
    lib, _ = probes
    mem = np.zeros(256, np.int32)
    seen = np.zeros(256, np.int32)
    assert lib.probe_lockstep(4, 64, ptr(mem), ptr(seen), None) == SUCCESS
    g = np.arange(256)
    assert np.array_equal(seen, g - g % 32 + (g % 32 + 1) % 32 + 1)


def test_kernel_warp_fold_is_dipp_fold_lanes32(probes):
    """The reduction kernels' fold gives lane 0 the sum in the tree order of dipp_fold_lanes32, and the
    other lanes the partial values a GPU warp leaves there."""
    lib, _ = probes
    rng = np.random.default_rng(3)
    values = (rng.standard_normal(64) * 10.0 ** rng.integers(-3, 4, 64)).astype(np.float32)
    out = np.zeros(128, np.float32)
    assert lib.probe_fold(1, 64, ptr(values), ptr(out), None) == SUCCESS
    for warp in range(2):
        lanes = values[32 * warp:32 * warp + 32].copy()
        for width in (16, 8, 4, 2, 1):  # every lane adds the value `width` lanes down, lanes past 31 their own
            lanes = lanes + np.concatenate([lanes[width:], lanes[32 - width:]])
        assert np.array_equal(out[64 * warp:64 * warp + 64:2], lanes)
        assert np.array_equal(out[64 * warp + 1:64 * warp + 64:2], -lanes)
        tree = values[32 * warp:32 * warp + 32].copy()  # dipp_fold_lanes32
        for width in (16, 8, 4, 2, 1):
            tree[:width] = tree[:width] + tree[width:2 * width]
        assert out[64 * warp] == tree[0]


def test_lane_exiting_before_a_full_mask_shuffle_fails_the_launch(probes):
    lib, _ = probes
    out = np.zeros(64, np.float32)
    assert lib.probe_early_exit(64, ptr(out), 20, None) == LAUNCH_FAILURE
    assert re.search(r"early_exit_kernel: block \(0,0,0\) warp 0: 20 lanes wait .* 12 exited", message(lib))
    assert lib.probe_last() == SUCCESS  # read once, then cleared
    assert lib.probe_early_exit(64, ptr(out), 32, None) == SUCCESS


def test_partial_warp_cannot_join_a_full_mask_shuffle(probes):
    lib, _ = probes
    out = np.zeros(48, np.float32)
    assert lib.probe_early_exit(48, ptr(out), 32, None) == LAUNCH_FAILURE
    assert "warp 1: 16 lanes wait" in message(lib) and "16 were never launched" in message(lib)


def test_lanes_at_different_shuffles_fail(probes):
    lib, _ = probes
    out = np.zeros(32, np.float32)
    assert lib.probe_two_sites(ptr(out), None) == LAUNCH_FAILURE
    assert "divergent warp" in message(lib) and "probe_kernels.cu" in message(lib)
    assert lib.probe_partial_mask(ptr(out), None) == LAUNCH_FAILURE
    assert "mask 0x0000ffff" in message(lib)


def test_invalid_configurations_are_refused_without_running(probes):
    lib, _ = probes
    out = np.zeros(12 * 2048, np.uint32)
    for grid, block in [((0, 1, 1), (32, 1, 1)), ((1, 1, 1), (2048, 1, 1)), ((1, 1, 1), (1, 1, 128)),
                        ((1, 70000, 1), (1, 1, 1)), ((1, 1, 1), (0, 1, 1))]:
        assert lib.probe_ids(*grid, *block, ptr(out), None) == INVALID_CONFIGURATION, (grid, block)
        assert "invalid configuration" in message(lib)
    assert not out.any()
    assert lib.probe_error_string(INVALID_CONFIGURATION) == b"invalid configuration argument"


def test_errors_stick_until_read(probes):
    lib, _ = probes
    out = np.zeros(32, np.float32)
    lib.probe_launch_early_exit(32, ptr(out), 1, None)
    assert lib.probe_peek() == LAUNCH_FAILURE and lib.probe_peek() == LAUNCH_FAILURE
    lib.probe_launch_early_exit(2048, ptr(out), 32, None)  # a second error does not replace the first
    assert lib.probe_last() == LAUNCH_FAILURE
    assert lib.probe_last() == SUCCESS


def test_atomic_add_counts_every_thread(probes):
    lib, _ = probes
    count = np.zeros(1, np.uint64)
    assert lib.probe_atomic(7, 96, ptr(count), None) == SUCCESS
    assert int(count[0]) == 7 * (48 * 1 + 48 * 2)


def test_stream_records_launches_and_caps_grids(probes):
    lib, runtime = probes
    out = np.zeros(12 * 10 * 64, np.uint32)
    with cuda_emu.Stream(runtime, max_grid=3) as stream:
        handle = ctypes.c_void_p(stream.handle)
        assert lib.probe_ids(10, 1, 1, 64, 1, 1, ptr(out), handle) == SUCCESS
        stats = stream.stats()
        kernel = stats.kernel_table()["ids_kernel"]
        assert (stats.launches, stats.threads, kernel.launches, kernel.max_grid, kernel.block) == (1, 192, 1, 3, 64)
        assert out.reshape(-1, 12)[:192, 9].tolist() == [3] * 192  # gridDim says what ran
        assert not out.reshape(-1, 12)[192:].any()


def test_scratch_memory_is_aligned_tracked_and_checked(probes):
    lib, runtime = probes
    with cuda_emu.Stream(runtime) as stream:
        handle = ctypes.c_void_p(stream.handle)
        blocks = []
        for size in (1, 4096, 0):
            p = ctypes.c_void_p()
            assert lib.probe_malloc(ctypes.byref(p), size, handle) == SUCCESS
            assert p.value % 256 == 0
            blocks.append(p)
        stats = stream.stats()
        assert (stats.allocs, stats.live_bytes, stats.peak_bytes) == (3, 4097, 4097)
        for p in blocks:
            assert lib.probe_free(p, handle) == SUCCESS
        assert (stream.stats().frees, stream.stats().live_bytes) == (3, 0)
        foreign = np.zeros(1024, np.uint8)
        assert lib.probe_free(ctypes.c_void_p(foreign.ctypes.data + 256 - foreign.ctypes.data % 256), handle) \
            == INVALID_VALUE
        assert "not from cudaMallocAsync" in message(lib)
        assert lib.probe_last() == INVALID_VALUE


def test_injected_failures_and_foreign_streams(probes):
    lib, runtime = probes
    out = np.zeros(12 * 64, np.uint32)
    with cuda_emu.Stream(runtime, fail_alloc_at=2, fail_launch_at=2) as stream:
        handle = ctypes.c_void_p(stream.handle)
        p = ctypes.c_void_p()
        assert lib.probe_malloc(ctypes.byref(p), 16, handle) == SUCCESS
        q = ctypes.c_void_p(1)
        assert lib.probe_malloc(ctypes.byref(q), 16, handle) == MEMORY and q.value is None
        lib.probe_last()
        assert lib.probe_free(p, handle) == SUCCESS
        assert lib.probe_ids(1, 1, 1, 64, 1, 1, ptr(out), handle) == SUCCESS
        assert lib.probe_ids(1, 1, 1, 64, 1, 1, ptr(out), handle) == LAUNCH_FAILURE
        assert stream.stats().failed == 2 and "launch 2 failed" in stream.stats().message.decode()
    not_a_stream = np.zeros(64, np.uint64)
    assert lib.probe_ids(1, 1, 1, 1, 1, 1, ptr(out), ptr(not_a_stream)) == INVALID_HANDLE


def test_build_cache_keeps_the_most_recently_used_builds(tmp_path):
    """build/host_emu keeps the newest builds; one used within the grace period stays whatever its rank."""
    now = time.time()
    ages = {"a": 5000, "b": 4000, "c": 3000, "d": 2000, "e": 1000, "recent": 10}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "libdipp_cuda_emu.so").write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "stray.tmp").write_bytes(b"")  # files are not builds
    removed = cuda_emu.prune(tmp_path, keep=2, grace_s=2500)
    assert sorted(p.name for p in removed) == ["a", "b", "c"]  # "d" is past the rank but within the grace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e", "recent", "stray.tmp"]
    assert cuda_emu.prune(tmp_path / "absent") == []


def test_a_cached_build_is_marked_as_used(tmp_path):
    lib = cuda_emu.build_library()
    os.utime(lib.parent, (1.0, 1.0))
    assert cuda_emu.build_library() == lib and time.time() - lib.parent.stat().st_mtime < 60
