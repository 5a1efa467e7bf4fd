"""The binding: zero-copy NumPy and DLPack (0.x and 1.x) ingestion, out=, GIL release."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
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


# --------------------------------------------------------------------------- lazily negated / conjugated views

neg = torch._neg_view


def _core_neg_calls():
    """(argument name, call) with one lazily negated tensor each, inputs and outputs."""
    x, z = torch.arange(1.0, 13.0).reshape(2, 6), torch.zeros(2, 6)
    yield "cond", lambda: _core.cfg_combine(z, neg(x), torch.empty(2, 6), 1.0)
    yield "uncond", lambda: _core.cfg_combine(neg(x), z, torch.empty(2, 6), 1.0)
    yield "out", lambda: _core.cfg_combine(z, x, neg(torch.zeros(2, 6)), 1.0)
    yield "d_ta", lambda: _core.ta_loss(neg(x), z, torch.empty(2), weighting="unit")
    yield "grad_out", lambda: _core.ta_loss(x, z, torch.empty(2), None, neg(torch.zeros(2, 6)), weighting="unit")
    yield "out", lambda: _core.fill_uniform(neg(torch.zeros(8)), 1)
    yield "ema[0]", lambda: _core.ema_update([neg(torch.zeros(3))], [torch.ones(3)], 0.5)
    yield "params[0]", lambda: _core.ema_update([torch.zeros(3)], [neg(torch.ones(3))], 0.5)
    yield "sigma", lambda: _core.add_noise(x, neg(torch.ones(2)), torch.empty(2, 6), 1)
    # the everyday source of a real tensor with the negative bit: the imaginary part of a conjugate
    im = torch.complex(torch.zeros(2, 6), x).conj().imag  # strided too; the sign is checked first
    assert im.is_neg()
    yield "cond", lambda: _core.cfg_combine(z, im, torch.empty(2, 6), 1.0)


def test_core_refuses_negated_views_by_name():
    """DLPack carries no negation bit: before the fix cfg_combine(0, neg_view(x), out, 1) returned +x.

    Torch's __dlpack__ exports such views without complaint, so the binding asks is_neg() itself."""
    for name, call in _core_neg_calls():
        with pytest.raises(BufferError, match=rf"^{re.escape(name)}: a lazily negated view"):
            call()


def test_core_refuses_conjugated_views_by_name():
    z = torch.zeros(4, dtype=torch.complex64).conj()
    assert z.is_conj()
    with pytest.raises(BufferError, match=r"^out: a lazily conjugated view"):
        _core.fill_uniform(z, 1)


class RaisingIsNeg:
    """A DLPack producer whose is_neg() raises."""

    def __init__(self):
        self.tensor = torch.zeros(2, 6)

    def is_neg(self):
        raise RuntimeError("is_neg broke")

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def test_core_wraps_a_failing_is_neg():
    with pytest.raises(BufferError, match=r"^cond: is_neg\(\) failed \(RuntimeError: is_neg broke\)"):
        _core.cfg_combine(torch.zeros(2, 6), RaisingIsNeg(), torch.empty(2, 6), 1.0)


def test_public_api_reads_negated_inputs_with_their_sign():
    x = torch.arange(1.0, 13.0).reshape(2, 6)
    z = torch.zeros(2, 6)
    torch.testing.assert_close(kernels.cfg_combine(z, neg(x), 1.0), -x)
    torch.testing.assert_close(kernels.cfg_combine(z, torch.complex(z, x).conj().imag, 1.0), -x)
    ta = kernels.ta_loss(neg(x), z, weighting="unit", reduction="sum")
    torch.testing.assert_close(ta.grad, -x)  # 2 (D_TA - x0) / B with B = 2
    g = kernels.generator_grad(z, neg(x), z, weighting="unit")
    torch.testing.assert_close(g.grad, -x / 2)
    ema = [torch.zeros(3)]
    kernels.ema_update(ema, [neg(torch.ones(3))], 0.5)
    torch.testing.assert_close(ema[0], torch.full((3,), -0.5))


@pytest.mark.parametrize(
    "name,call",
    [
        ("out", lambda: kernels.cfg_combine(torch.zeros(3), torch.ones(3), 2.0, out=neg(torch.zeros(3)))),
        ("out", lambda: kernels.fill_normal(neg(torch.zeros(3)), 1)),
        ("out", lambda: kernels.add_noise(torch.ones(1, 3), torch.ones(1), 1, out=neg(torch.zeros(1, 3)))),
        ("out", lambda: kernels.generator_grad(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3),
                                               out=neg(torch.zeros(1, 3)))),
        ("ema[0]", lambda: kernels.ema_update([neg(torch.zeros(3))], [torch.ones(3)], 0.5)),
        ("exp_avg_sqs[0]", lambda: kernels.adam_step([torch.ones(3)], [torch.ones(3)], None,
                                                     [neg(torch.zeros(3))], lr=1e-3, step=1)),
    ],
    ids=["cfg-out", "fill-out", "noise-out", "gen-out", "ema", "adam-v"],
)
def test_public_api_refuses_negated_outputs(name, call):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: a lazily negated/conjugated view"):
        call()
