"""Every CUDA launcher of cuda/*.cu against the CPU kernels, with no GPU: the unmodified kernel
bodies run on the CPU runtime of cuda/host_emu (g++, FMA contraction off as nvcc --fmad=false),
called through the binding's CUDA path (tensors presented as CUDA device 0), and the CPU kernels
through the same binding on the same inputs and seeds.

What is promised (docs/ALGORITHM.md section 9, dipp.h, cuda/chunk_reduce.cuh): the same per-element
math (csrc/dipp_math.h) and the same reduction order (lanes of 32, warp shuffle-down tree, chunks
of 1024 added in double), hence identical bits, whatever the launch shape. Here even the libm calls
(logf, cosf, sinf, expf in normals and sigma draws) are the same glibc functions on both sides, so
every output of every kernel must match bit for bit, NaN payloads included; on a real GPU those
libm-based outputs get the few-ulp tolerance of tests/test_cuda_parity.py instead.

Launch shapes: the release build (256 threads per block) as launched and with grids cut to 1 and 3
blocks by the runtime, builds for 32 threads (as launched, grid cut to 2) and for 1024 threads.
"""

from __future__ import annotations

import functools

import cuda_emu
import pytest
import torch

from diffinstruct import _core

pytestmark = pytest.mark.skipif(not cuda_emu.HAVE_GXX, reason="g++ is needed to build the CPU CUDA runtime")

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# (id, DIPP_CUDA_THREADS of the build (None: release), max_grid of the stream (0: as launched))
SHAPES = [("t256", None, 0), ("t256-grid1", None, 1), ("t256-grid3", None, 3), ("t32", 32, 0),
          ("t32-grid2", 32, 2), ("t1024", 1024, 0)]
# (batch, per_sample): B = 1; per-sample sizes below a Philox block, a warp row and a chunk, one
# element short of and past a chunk, exact chunks, and 4884 = 4 chunks + 788 (a partial warp row)
SIZES = [(1, 1), (7, 3), (1, 31), (1, 1023), (1, 1025), (2, 2048), (3, 4884)]
SHAPE_SIZES = [(7, 3), (3, 4884)]  # what the other launch shapes run
CASES = [pytest.param(shape, size, id=f"{shape[0]}-{size[0]}x{size[1]}")
         for shape in SHAPES for size in (SIZES if shape[0] == "t256" else SHAPE_SIZES)]

REDUCE, APPLY = "dipp_cuda_chunk_reduce_kernel<NQ, Op>", "dipp_cuda_chunk_apply_kernel<Op>"


@functools.cache
def emulated(threads: int | None) -> cuda_emu.Emulated:
    return cuda_emu.Emulated(cuda_emu.build_library(threads))


def int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(name: str, cpu: torch.Tensor, emu: torch.Tensor) -> None:
    assert cpu.dtype == emu.dtype and cpu.shape == emu.shape
    differ = int_view(cpu) != int_view(emu)
    if differ.any():
        first = int(differ.flatten().nonzero()[0])
        a, b = cpu.flatten()[first].item(), emu.flatten()[first].item()
        raise AssertionError(f"{name}: {int(differ.sum())} of {cpu.numel()} elements differ; first at flat index "
                             f"{first}: cpu {a!r}, emulated CUDA {b!r}")


class Out:
    """An output argument: the CPU gets it zero-filled, the emulated device a sentinel, so an element
    either side leaves unwritten shows up as a difference."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def sentinel_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan") if t.is_floating_point() else -7)


def run_both(shape, op: str, kernels: set[str], **kwargs):
    """op(**kwargs) on the CPU and on the emulated device; compares every tensor argument afterwards
    (outputs, in-place state, and inputs, which must stay untouched) and checks what ran."""
    _, threads, max_grid = shape
    emu = emulated(threads)
    cpu_kwargs, emu_kwargs, pairs, wrapped = {}, {}, [], []
    for key, value in kwargs.items():
        if isinstance(value, Out):
            cpu_kwargs[key], mine = torch.zeros_like(value.tensor), sentinel_like(value.tensor)
        elif isinstance(value, torch.Tensor):
            cpu_kwargs[key], mine = value, value.clone()
        elif isinstance(value, list):
            cpu_kwargs[key], mine = value, [t.clone() for t in value]
        else:
            cpu_kwargs[key] = emu_kwargs[key] = value
            continue
        device = cuda_emu.on_device(mine)
        emu_kwargs[key] = device
        wrapped += device if isinstance(device, list) else [device]
        pairs += [(key, cpu_kwargs[key], mine)]
    with emu.stream(max_grid=max_grid) as stream:
        getattr(emu.core, op)(**emu_kwargs, stream=stream.handle)
        stats = stream.stats()
    getattr(_core, op)(**cpu_kwargs)
    for key, cpu, mine in pairs:
        if isinstance(cpu, list):
            for i, (a, b) in enumerate(zip(cpu, mine, strict=True)):
                assert_same_bits(f"{op}: {key}[{i}]", a, b)
        else:
            assert_same_bits(f"{op}: {key}", cpu, mine)
    # it ran on the emulated device, in the launch shape asked for, and gave back its scratch
    table = stats.kernel_table()
    assert set(table) == kernels, (op, sorted(table))
    assert stats.failed == 0 and stats.live_bytes == 0 and stats.allocs == stats.frees, stats.message
    for name, k in table.items():
        assert k.block == emu.runtime.threads_per_block == (threads or 256), name
        if max_grid:
            assert k.max_grid <= max_grid, name
    if REDUCE in table:
        assert stats.shuffles > 0
    assert all(w.requests and all(s == -1 for s in w.requests) for w in wrapped)  # the binding's CUDA request
    return cpu_kwargs


def batched(dtype: torch.dtype, size: tuple[int, int], seed: int, scale: float = 1.0, special: bool = False):
    """Normals of shape (batch, per_sample) in dtype; `special` plants, in sample 0 of a batch of two
    or more (the other samples keep finite sums, whose bits test the reduction order), NaN, +-Inf
    and values whose products overflow float16 / bfloat16, so that outputs turn non-finite from
    finite inputs and the non-finite counts have something to count."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=g) * scale
    if special and size[0] >= 2 and size[1] > 64:
        first = x[0]
        first[5], first[37], first[-3] = float("nan"), float("inf"), float("-inf")
        first[11] = 6.0e4 if dtype == torch.float16 else 3.0e38
        first[-40] = -6.0e4 if dtype == torch.float16 else -3.0e38
    return x.to(dtype)


def sigmas(batch: int) -> torch.Tensor:
    values = [0.002, 0.3, 1.0, 2.5, 40.0, 80.0, 0.05]
    return torch.tensor([values[b % len(values)] for b in range(batch)], dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", CASES)
def test_fills(dtype, shape, size):
    n = size[0] * size[1]
    out = torch.empty(n, dtype=DTYPES[dtype])
    for op in ("fill_uniform", "fill_normal"):
        for seed, offset in ((42, 0), (2**63 + 5, 2**40 + 3)):
            run_both(shape, op, {"dipp_fill_kernel<DT, NORMAL>"}, out=Out(out), seed=seed, offset=offset)


@pytest.mark.parametrize("shape, size", CASES)
def test_sample_sigma(shape, size):
    batch = size[0] * size[1]
    table = torch.from_numpy(_core.sigma_table("iddpm_linear")).float()
    common = dict(seed=7, offset=3, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0)
    run_both(shape, "sample_sigma", {"dipp_sigma_kernel"}, sigma_out=Out(torch.empty(batch)), **common)
    run_both(shape, "sample_sigma", {"dipp_sigma_kernel"}, sigma_out=Out(torch.empty(batch)), table=table,
             index_out=Out(torch.empty(batch, dtype=torch.int64)), snap=True, **common)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", CASES)
def test_add_noise_and_cfg(dtype, shape, size):
    dt = DTYPES[dtype]
    x0 = batched(dt, size, 1, special=True)
    sigma = sigmas(size[0])
    for flow in (False, True):
        run_both(shape, "add_noise", {"dipp_noise_kernel<DT>"}, x0=x0, sigma=sigma.clamp(max=1.0) if flow else sigma,
                 xt_out=Out(x0), seed=11, offset=5, eps_out=Out(x0), flow=flow)
    run_both(shape, "add_noise", {"dipp_noise_kernel<DT>"}, x0=x0, sigma=sigma, xt_out=Out(x0), seed=2**64 - 1)
    for omega in (1.0, 4.5):
        run_both(shape, "cfg_combine", {"dipp_cfg_kernel<DT>"}, uncond=batched(dt, size, 2, special=True),
                 cond=batched(dt, size, 3, 100.0), out=Out(x0), omega=omega)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", CASES)
def test_ta_loss(dtype, shape, size):
    dt = DTYPES[dtype]
    d_ta, x0 = batched(dt, size, 4, special=True), batched(dt, size, 5, 300.0)
    batch = size[0]
    run_both(shape, "ta_loss", {REDUCE, "dipp_ta_finalize_kernel", APPLY}, d_ta=d_ta, x0=x0,
             loss_out=Out(torch.empty(batch)), sigma=sigmas(batch), grad_out=Out(d_ta),
             nonfinite_out=Out(torch.empty(batch, dtype=torch.int64)), weighting="edm", reduction="mean")
    run_both(shape, "ta_loss", {REDUCE, "dipp_ta_finalize_kernel"}, d_ta=d_ta, x0=x0,
             loss_out=Out(torch.empty(batch)), weighting="unit", reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", CASES)
def test_generator_grad(dtype, shape, size):
    dt = DTYPES[dtype]
    batch = size[0]
    x0, d_ta, d_cond = batched(dt, size, 6, special=True), batched(dt, size, 7), batched(dt, size, 8, 50.0)
    kernels = {REDUCE, "dipp_gen_finalize_kernel", APPLY}

    def outs():
        return dict(grad_out=Out(x0), weight_out=Out(torch.empty(batch)), ref_dist_out=Out(torch.empty(batch)),
                    gap_out=Out(torch.empty(batch)), surrogate_out=Out(torch.empty(batch)),
                    nonfinite_out=Out(torch.empty(batch, dtype=torch.int64)))

    dr = batched(dt, size, 10, 1e3)
    dr[-1, -1] = 6.0e4 if dt == torch.float16 else 3.0e38  # finite, but alpha dr / B overflows the output
    cpu = run_both(shape, "generator_grad", kernels, x0=x0, d_ta=d_ta, d_cond=d_cond, **outs(),
                   d_uncond=batched(dt, size, 9), omega=4.5, dr=dr, alpha=8.0, weighting="normalized", min_norm=1e-5)
    assert cpu["nonfinite_out"][-1] >= 1  # pass 2's count of outputs that overflowed from finite inputs ran
    run_both(shape, "generator_grad", kernels, x0=x0, d_ta=d_ta, d_cond=d_cond, **outs(), weighting="unit")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", CASES)
def test_huber_terms(dtype, shape, size):
    dt = DTYPES[dtype]
    batch = size[0]
    x0, d_p, d_q = batched(dt, size, 11, special=True), batched(dt, size, 12), batched(dt, size, 13)
    for weighting, c in (("sigma2", 0.5), ("unit", 1e-3)):
        run_both(shape, "huber_terms", {REDUCE, "dipp_huber_finalize_kernel", APPLY}, x0=x0, d_p=d_p, d_q=d_q,
                 sigma=sigmas(batch), a_out=Out(x0), b_out=Out(x0), dprime_out=Out(x0),
                 ysq_out=Out(torch.empty(batch)), yr_out=Out(torch.empty(batch)), h_out=Out(torch.empty(batch)),
                 value_out=Out(torch.empty(batch)), nonfinite_out=Out(torch.empty(batch, dtype=torch.int64)), c=c,
                 weighting=weighting)


def tensor_list(dtype: torch.dtype, shapes, seed: int, mixed: bool):
    """Tensors of `shapes`, in dtype, or (mixed) cycling through the three dtypes."""
    g = torch.Generator().manual_seed(seed)
    order = list(DTYPES.values())
    return [torch.randn(s, generator=g).to(order[i % 3] if mixed else dtype) for i, s in enumerate(shapes)]


# more tensors than one multi-tensor launch takes (64), sizes around a chunk
OPTIM_SHAPES = [(3,), (1025,), (17, 33), (1,), (2048,)] * 14


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s[0]) for s in SHAPES])
def test_ema_update(dtype, shape):
    dt = DTYPES[dtype]
    ema = tensor_list(dt, OPTIM_SHAPES, 14, mixed=False)
    for mixed in (False, True):
        run_both(shape, "ema_update", {"dipp_mt_kernel<Op>"}, ema=ema, params=tensor_list(dt, OPTIM_SHAPES, 15, mixed),
                 decay=0.999)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s[0]) for s in SHAPES])
def test_adam_step(dtype, shape):
    dt = DTYPES[dtype]
    params = tensor_list(dt, OPTIM_SHAPES, 16, mixed=False)
    grads = tensor_list(dt, OPTIM_SHAPES, 17, mixed=True)
    moments = tensor_list(torch.float32, OPTIM_SHAPES, 18, mixed=False)
    squares = [m.abs() for m in tensor_list(torch.float32, OPTIM_SHAPES, 19, mixed=False)]
    common = dict(lr=1e-3, beta2=0.999, eps=1e-8, params=params, grads=grads, exp_avg_sqs=squares)
    for step, decoupled, wd in ((1, True, 0.01), (7, False, 0.1), (3, True, 0.0)):
        run_both(shape, "adam_step", {"dipp_mt_kernel<Op>"}, exp_avgs=moments, beta1=0.9, weight_decay=wd, step=step,
                 decoupled=decoupled, **common)
    run_both(shape, "adam_step", {"dipp_mt_kernel<Op>"}, exp_avgs=None, beta1=0.0, weight_decay=0.0, step=2,
             decoupled=False, **common)
