"""The binding: zero-copy NumPy and DLPack (0.x and 1.x) ingestion, out=, GIL release."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import torch.utils.dlpack

from diffinstruct import _core, kernels


class LegacyProducer:
    """Speaks only the DLPack 0.x protocol: __dlpack__() without max_version."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.calls = 0

    def __dlpack__(self, stream=None):
        self.calls += 1
        return torch.utils.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


class VersionedProducer(LegacyProducer):
    def __init__(self, tensor):
        super().__init__(tensor)
        self.max_version = None

    def __dlpack__(self, stream=None, max_version=None):
        self.calls += 1
        self.max_version = max_version
        return self.tensor.__dlpack__(max_version=max_version)


def test_outputs_are_written_in_place_zero_copy_torch_and_numpy():
    out_t = torch.zeros(3, 7)
    ptr = out_t.data_ptr()
    _core.fill_normal(out_t, 5)
    assert out_t.data_ptr() == ptr and out_t.abs().sum() > 0
    out_n = np.zeros((3, 7), np.float32)
    _core.fill_normal(out_n, 5)
    np.testing.assert_array_equal(out_n, out_t.numpy())


def test_dlpack_legacy_and_versioned_capsules():
    u, c = torch.randn(4, 9), torch.randn(4, 9)
    out = torch.empty(4, 9)
    legacy, versioned = LegacyProducer(out), VersionedProducer(c)
    _core.cfg_combine(u, versioned, legacy, 2.0)
    # the max_version call fails at argument binding (TypeError), the 0.x retry runs once
    assert legacy.calls == 1
    assert versioned.calls == 1 and versioned.max_version == (1, 0)
    torch.testing.assert_close(out, u + 2.0 * (c - u))


def test_numpy_and_torch_inputs_mix_on_cpu():
    u = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    c = torch.randn(2, 5)
    out = np.empty((2, 5), np.float32)
    _core.cfg_combine(u, c, out, 0.5)
    np.testing.assert_allclose(out, u + 0.5 * (c.numpy() - u), rtol=1e-6)


def test_out_argument_is_used():
    x0 = torch.randn(2, 3, 8, 8)
    out = torch.empty_like(x0)
    xt = kernels.add_noise(x0, torch.tensor([0.5, 1.0]), 1, out=out)
    assert xt is out
    res = kernels.generator_grad(x0, x0 + 1, x0, out=torch.empty_like(x0))
    assert res.grad.shape == x0.shape


def test_tensors_requiring_grad_are_accepted():
    x0 = torch.randn(2, 16, requires_grad=True)
    res = kernels.generator_grad(x0, torch.randn(2, 16), torch.randn(2, 16))
    x0.backward(res.grad)
    torch.testing.assert_close(x0.grad, res.grad)


def test_gil_is_released_during_compute():
    """A Python thread keeps running while a long kernel call is in flight."""
    big = np.zeros(40_000_000, np.float32)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)
    start = time.perf_counter()
    _core.fill_normal(big, 1)
    end = time.perf_counter()
    stop.set()
    thread.join()
    during = [t for t in ticks if start < t < end]
    assert end - start > 0.02, "the call was too short to observe"
    assert len(during) >= 3, f"only {len(during)} ticks in {end - start:.3f}s: the GIL was held"
