"""CPU vs CUDA kernels on the same inputs and seeds (runs only where a GPU is present).

Both backends share csrc/dipp_math.h and the reduction order, with FMA contraction
off, so integer streams, per-sample sums and element-wise arithmetic agree bit for
bit; libm calls (logf, cosf, sinf, expf) may differ by an ulp, so normals and
sigma are compared with a few-ulp tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import FLOAT_DTYPES, requires_cuda
from diffinstruct import kernels

pytestmark = requires_cuda
SHAPE = (5, 4, 33, 37)  # per_sample 4884: partial chunks and partial warps


def pair(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cpu = torch.randn(SHAPE, generator=g).to(dtype)
    return cpu, cpu.cuda()


def same(cpu, gpu):
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


def ulps(cpu, gpu, n=4):
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=n * 1.2e-7, atol=n * 1.2e-7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fills(dtype):
    for fill in (kernels.fill_uniform, kernels.fill_normal):
        a, b = torch.empty(10_001, dtype=dtype), torch.empty(10_001, dtype=dtype, device="cuda")
        fill(a, 42, 7)
        fill(b, 42, 7)
        if fill is kernels.fill_uniform:
            same(a, b)
        else:
            ulps(a, b, 8 if dtype == torch.float32 else 300)


def test_sample_sigma():
    table = kernels.sigma_table("iddpm_linear")
    s_c, i_c = kernels.sample_sigma(4096, 5, 1, sigma_min=0.01, sigma_max=156.6, table=table, device="cpu")
    s_g, i_g = kernels.sample_sigma(4096, 5, 1, sigma_min=0.01, sigma_max=156.6, table=table, device="cuda")
    ulps(s_c, s_g)
    assert (i_c == i_g.cpu()).float().mean() > 0.999


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_noise_cfg_and_losses(dtype):
    (x_c, x_g), (t_c, t_g), (c_c, c_g), (u_c, u_g), (r_c, r_g) = (pair(dtype, s) for s in range(5))
    sig_c = torch.tensor([0.01, 0.3, 1.0, 2.5, 40.0])
    sig_g = sig_c.cuda()
    xt_c, e_c = kernels.add_noise(x_c, sig_c, 3, 4, return_eps=True)
    xt_g, e_g = kernels.add_noise(x_g, sig_g, 3, 4, return_eps=True)
    ulps(e_c, e_g, 8 if dtype == torch.float32 else 300)
    ulps(xt_c, xt_g, 400 if dtype == torch.float32 else 3000)
    same(kernels.cfg_combine(u_c, c_c, 4.5), kernels.cfg_combine(u_g, c_g, 4.5))
    for a, b in zip(kernels.ta_loss(t_c, x_c, sig_c), kernels.ta_loss(t_g, x_g, sig_g), strict=True):
        same(a, b)
    res_c = kernels.generator_grad(x_c, t_c, c_c, d_uncond=u_c, omega=4.5, dr=r_c, alpha=2.0)
    res_g = kernels.generator_grad(x_g, t_g, c_g, d_uncond=u_g, omega=4.5, dr=r_g, alpha=2.0)
    for a, b in zip(res_c, res_g, strict=True):
        same(a, b)
    for a, b in zip(kernels.huber_terms(x_c, c_c, t_c, sig_c, 0.5), kernels.huber_terms(x_g, c_g, t_g, sig_g, 0.5),
                    strict=True):
        same(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_optimizers(dtype):
    shapes = [(3,), (1025,), (17, 33), (4096,)] * 20  # more tensors than one launch takes
    g = torch.Generator().manual_seed(9)
    p_c = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    gr_c = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    p_g, gr_g = [p.cuda() for p in p_c], [x.cuda() for x in gr_c]
    m_c, v_c = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    m_g, v_g = [m.cuda() for m in m_c], [v.cuda() for v in v_c]
    for step in (1, 2):
        kernels.adam_step(p_c, gr_c, m_c, v_c, lr=1e-3, beta1=0.9, weight_decay=0.01, step=step, decoupled=True)
        kernels.adam_step(p_g, gr_g, m_g, v_g, lr=1e-3, beta1=0.9, weight_decay=0.01, step=step, decoupled=True)
    ema_c, ema_g = [p.clone() for p in gr_c], [p.clone() for p in gr_g]
    kernels.ema_update(ema_c, p_c, 0.95)
    kernels.ema_update(ema_g, p_g, 0.95)
    for a, b in zip(p_c + m_c + v_c + ema_c, p_g + m_g + v_g + ema_g, strict=True):
        same(a, b)


def test_reference_fallback_warns_once_and_matches_cpu():
    """Without the CUDA library, CUDA tensors take the PyTorch reference, with a warning."""
    code = (
        "import warnings, torch; from diffinstruct import kernels\n"
        "x = torch.randn(4, 64); t = torch.randn(4, 64); c = torch.randn(4, 64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    g = kernels.generator_grad(x.cuda(), t.cuda(), c.cuda()).grad.cpu()\n"
        "assert any('reference' in str(m.message) for m in w), w\n"
        "torch.testing.assert_close(g, kernels.generator_grad(x, t, c).grad, rtol=1e-5, atol=1e-6)\n"
    )
    env = dict(os.environ, DIPP_CUDA_LIBRARY="/nonexistent/libdipp_cuda.so")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
