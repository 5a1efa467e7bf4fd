"""The binding's CUDA path without a GPU, on the emulated CUDA library (cuda/host_emu): DLPack CUDA
device types and ids, CPU/CUDA mixes, the lazy dlopen and its failures, and CUDA errors from
the kernels (scratch allocation, launches) turning into Python exceptions with no scratch leaked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import cuda_emu
import pytest
import torch
from cuda_emu import on_device

pytestmark = pytest.mark.skipif(not cuda_emu.HAVE_GXX, reason="g++ is needed to build the CPU CUDA runtime")


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.Emulated(cuda_emu.build_library())


def ta_args(batch=3, per_sample=2000):
    g = torch.Generator().manual_seed(0)
    d, x = torch.randn(batch, per_sample, generator=g), torch.randn(batch, per_sample, generator=g)
    return d, x, torch.empty(batch), torch.rand(batch, generator=g) + 0.1, torch.empty_like(d)


def test_scratch_allocation_failure_is_memory_error_and_nothing_leaks(emu):
    d, x, loss, sigma, grad = ta_args()
    with emu.stream(fail_alloc_at=1) as stream:
        with pytest.raises(MemoryError, match="scratch"):
            emu.core.ta_loss(on_device(d), on_device(x), on_device(loss), sigma=on_device(sigma),
                             grad_out=on_device(grad), stream=stream.handle)
        stats = stream.stats()
        assert stats.launches == 0 and stats.allocs == 0 and "cudaMallocAsync" in stats.message.decode()


@pytest.mark.parametrize("failing_launch", [1, 2, 3])  # pass 1, the per-sample kernel, pass 2
def test_launch_failure_is_runtime_error_and_scratch_is_freed(emu, failing_launch):
    d, x, loss, sigma, grad = ta_args()
    with emu.stream(fail_launch_at=failing_launch) as stream:
        with pytest.raises(RuntimeError, match="CUDA runtime call failed"):
            emu.core.ta_loss(on_device(d), on_device(x), on_device(loss), sigma=on_device(sigma),
                             grad_out=on_device(grad), stream=stream.handle)
        stats = stream.stats()
        assert stats.launches == failing_launch - 1  # nothing launched after the failure
        assert stats.allocs == stats.frees == 1 and stats.live_bytes == 0
    # the error was consumed: the next call on a healthy stream succeeds
    with emu.stream() as stream:
        emu.core.ta_loss(on_device(d), on_device(x), on_device(loss), sigma=on_device(sigma),
                         grad_out=on_device(grad), stream=stream.handle)
        assert stream.stats().launches == 3


def test_multi_tensor_failure_in_a_later_launch(emu):
    """Adam over more tensors than one launch takes: the second launch fails, the error surfaces."""
    params = [torch.randn(10) for _ in range(70)]
    grads = [torch.randn(10) for _ in range(70)]
    state = [[torch.zeros(10) for _ in range(70)] for _ in range(2)]
    with emu.stream(fail_launch_at=2) as stream:
        with pytest.raises(RuntimeError):
            emu.core.adam_step(on_device(params), on_device(grads), on_device(state[0]), on_device(state[1]),
                               lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1,
                               stream=stream.handle)
        assert stream.stats().launches == 1


def test_cpu_and_cuda_tensors_do_not_mix(emu):
    x, y, out = torch.randn(4, 8), torch.randn(4, 8), torch.empty(4, 8)
    with pytest.raises(ValueError, match="cond is on cpu:0 but uncond is on cuda:0"):
        emu.core.cfg_combine(on_device(x), y, on_device(out), 2.0)
    with pytest.raises(ValueError, match="out is on cuda:0 but uncond is on cpu:0"):
        emu.core.cfg_combine(x, y, on_device(out), 2.0)


def test_tensors_on_two_devices_do_not_mix(emu):
    x, y, out = torch.randn(4, 8), torch.randn(4, 8), torch.empty(4, 8)
    with pytest.raises(ValueError, match="cuda:1 but uncond is on cuda:0"):
        emu.core.cfg_combine(on_device(x), on_device(y, 1), on_device(out), 2.0)
    emu.core.cfg_combine(on_device(x, 1), on_device(y, 1), on_device(out, 1), 2.0)  # one device, any id
    torch.testing.assert_close(out, x + 2.0 * (y - x), rtol=0, atol=1e-6)


def test_binding_asks_cuda_producers_for_no_synchronisation(emu):
    x, y, out = on_device(torch.randn(4, 8)), on_device(torch.randn(4, 8)), on_device(torch.empty(4, 8))
    emu.core.cfg_combine(x, y, out, 2.0, stream=0)
    assert x.requests == y.requests == out.requests == [-1]


def test_the_cuda_library_loads_on_the_first_cuda_tensor_only(monkeypatch):
    lib = cuda_emu.build_library()
    monkeypatch.setenv("DIPP_CUDA_LIBRARY", str(lib))
    core = cuda_emu.new_core()
    x = torch.randn(2, 8)
    core.cfg_combine(x, x, torch.empty(2, 8), 2.0)  # CPU tensors never load it
    assert core.cuda_status()[0] is False
    core.cfg_combine(on_device(x), on_device(x), on_device(torch.empty(2, 8)), 2.0)
    assert core.cuda_status()[0] is True


@pytest.mark.parametrize("what", ["missing", "not_a_library", "lacks_symbols"])
def test_unusable_cuda_library_raises_naming_why(tmp_path, monkeypatch, what):
    if what == "missing":
        path, reason = tmp_path / "absent.so", "absent.so"
    elif what == "not_a_library":
        path, reason = tmp_path / "garbage.so", "garbage.so"
        path.write_bytes(b"\x7fELF not really")
    else:
        path, reason = cuda_emu.build_probes(), "lacks the symbol dipp_cuda_fill_uniform"
    monkeypatch.setenv("DIPP_CUDA_LIBRARY", str(path))
    core = cuda_emu.new_core()
    x = torch.randn(2, 8)
    for _ in range(2):  # the reason is kept, not retried
        with pytest.raises(RuntimeError, match=reason):
            core.cfg_combine(on_device(x), on_device(x), on_device(torch.empty(2, 8)), 2.0)
    assert core.cuda_status()[0] is False
    core.cfg_combine(x, x, torch.empty(2, 8), 2.0)  # the CPU path is unaffected


@pytest.mark.parametrize("env, reason", [
    ({"DIPP_EMU_DEVICES": "0"}, r"no usable CUDA device \(no CUDA-capable device is detected\)"),
    ({"DIPP_EMU_DRIVER_VERSION": "12040"}, r"driver supports CUDA 12\.4 but the library was built with CUDA 13\.0"),
    ({"DIPP_EMU_NO_KERNEL_IMAGE": "1"}, r"no kernel image for this GPU .* DIPP_CUDA_ARCHS"),
], ids=["no-device", "old-driver", "no-kernel-image"])
def test_a_library_that_loads_but_cannot_run_is_refused_with_the_reason(monkeypatch, env, reason):
    """dlopen succeeds, but the device check the binding runs at load refuses the library, so the
    caller sees one reason up front (and the Python layer takes the reference), not a failing kernel."""
    lib = cuda_emu.build_library()
    monkeypatch.setenv("DIPP_CUDA_LIBRARY", str(lib))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    core = cuda_emu.new_core()
    loaded, _path, why = core.cuda_status(load=True)
    assert loaded is False and re.search(reason, why) and "cannot run here" in why, why
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=reason):
        core.cfg_combine(on_device(x), on_device(x), on_device(torch.empty(2, 8)), 2.0)


FALLBACK_CODE = """
import warnings, torch
from diffinstruct import kernels
from diffinstruct.errors import CudaFallbackWarning
from diffinstruct.kernels import backend
backend.is_cuda = backend.is_torch  # this process's CPU tensors stand for CUDA tensors
x, t, c = (torch.randn(3, 700, generator=torch.Generator().manual_seed(s)) for s in range(3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = kernels.generator_grad(x, t, c).grad
    again = kernels.generator_grad(x, t, c).grad
    kernels.cfg_combine(x, c, 3.0)
fallbacks = [w for w in caught if issubclass(w.category, CudaFallbackWarning)]
assert len(fallbacks) == 1, [str(w.message) for w in caught]
print(fallbacks[0].message)
with kernels.use_backend("reference"):
    expected = kernels.generator_grad(x, t, c).grad
assert torch.equal(first, expected) and torch.equal(again, expected)
"""


@pytest.mark.parametrize("env, reason", [
    ({"DIPP_EMU_DEVICES": "0"}, "no usable CUDA device"),
    ({"DIPP_EMU_DRIVER_VERSION": "12080"}, "driver supports CUDA 12.8"),
    ({"DIPP_EMU_DRIVER_VERSION": "0"}, "no NVIDIA driver is installed"),
    ({"DIPP_EMU_NO_KERNEL_IMAGE": "1"}, "no kernel image for this GPU"),
    ({"DIPP_CUDA_LIBRARY": "/nonexistent/libdipp_cuda.so"}, "/nonexistent/libdipp_cuda.so"),
], ids=["no-device", "old-driver", "no-driver", "no-kernel-image", "failing-dlopen"])
def test_unusable_cuda_library_gives_one_warning_and_the_reference(env, reason):
    """Each way the CUDA library cannot be used at run time, simulated: CUDA tensors take the PyTorch
    reference, with exactly one CudaFallbackWarning naming the reason, however many calls follow."""
    full_env = {**os.environ, "DIPP_CUDA_LIBRARY": str(cuda_emu.build_library()), **env}
    out = subprocess.run([sys.executable, "-c", FALLBACK_CODE], capture_output=True, text=True, env=full_env,
                         cwd=cuda_emu.ROOT)
    assert out.returncode == 0, out.stderr
    assert "PyTorch reference" in out.stdout and reason in out.stdout, out.stdout
