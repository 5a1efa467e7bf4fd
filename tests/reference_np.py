"""Float64 NumPy references of every kernel, written from docs/ALGORITHM.md, independent of the C code
and of diffinstruct.kernels.reference (which is PyTorch)."""

from __future__ import annotations

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """counter [n, 4], key [2] (uint64 holding 32-bit words) -> [n, 4] uint64."""
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0 = m0 * c[0]
        p1 = m1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return np.stack(c, axis=1)


def philox_stream_bits(seed: int, offset: int, n: int) -> np.ndarray:
    """Bits of elements 0..n-1: element i is lane i % 4 of block offset + i // 4."""
    nblocks = (n + 3) // 4
    block = (np.arange(nblocks, dtype=np.uint64) + np.uint64(offset)) & np.uint64(2**64 - 1)
    counter = np.stack([block & MASK32, block >> np.uint64(32), np.zeros_like(block), np.zeros_like(block)], axis=1)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    return philox4x32_10(counter, key)


def uniform(seed: int, offset: int, n: int) -> np.ndarray:
    bits = philox_stream_bits(seed, offset, n)
    return (((bits >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23).reshape(-1)[:n]


def normal(seed: int, offset: int, n: int) -> np.ndarray:
    bits = philox_stream_bits(seed, offset, n)
    u = ((bits >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23
    out = np.empty_like(u)
    for pair in range(2):
        radius = np.sqrt(-2.0 * np.log(u[:, 2 * pair]))
        angle = 2.0 * np.pi * u[:, 2 * pair + 1]
        out[:, 2 * pair] = radius * np.cos(angle)
        out[:, 2 * pair + 1] = radius * np.sin(angle)
    return out.reshape(-1)[:n]


def sample_sigma(batch, seed, offset, p_mean, p_std, sigma_min, sigma_max, table=None):
    sigma = np.clip(np.exp(p_mean + p_std * normal(seed, offset, batch)), sigma_min, sigma_max)
    if table is None:
        return sigma, None
    index = np.argmin(np.abs(table[None, :] - sigma[:, None]), axis=1)
    return sigma, index


def iddpm_linear_table(steps=1000, beta_start=1e-4, beta_end=0.02, clip=1e-3):
    u = np.zeros(steps + 1)
    for j in range(steps, 0, -1):
        beta = beta_end + (beta_start - beta_end) * j / steps
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(1 - beta, clip) - 1)
    return u[:steps][::-1].copy()


def scaled_linear_table(steps=1000, beta_start=0.00085, beta_end=0.012):
    betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), steps) ** 2
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def per_sample(x):
    return x.reshape(x.shape[0], -1)


def bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(x0, sigma, seed, offset, flow=False):
    eps = normal(seed, offset, x0.size).reshape(x0.shape)
    s = bcast(sigma, x0)
    xt = (1 - s) * x0 + s * eps if flow else x0 + s * eps
    return xt, eps


def cfg(uncond, cond, omega):
    return uncond + omega * (cond - uncond)


def edm_lambda(sigma, sigma_data=0.5):
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def ta_loss(d_ta, x0, sigma, weighting="edm", sigma_data=0.5, reduction="mean"):
    b, n = d_ta.shape[0], d_ta[0].size
    diff = per_sample(d_ta) - per_sample(x0)
    w = edm_lambda(sigma, sigma_data) if weighting == "edm" else np.ones(b)
    scale = 1.0 / n if reduction == "mean" else 1.0
    loss = w * scale * (diff**2).sum(1)
    grad = (2 * (w * scale / b)[:, None] * diff).reshape(d_ta.shape)
    return loss, grad


def generator_grad(x0, d_ta, d_cond, d_uncond=None, omega=1.0, dr=None, alpha=0.0, weighting="normalized",
                   min_norm=1e-5):
    b = x0.shape[0]
    ref = d_cond if d_uncond is None else cfg(d_uncond, d_cond, omega)
    diff = per_sample(d_ta - ref)
    ref_dist = np.abs(per_sample(x0 - ref)).mean(1)
    w = 1.0 / np.maximum(ref_dist, min_norm) if weighting == "normalized" else np.ones(b)
    r = per_sample(dr) if dr is not None else 0.0
    grad = ((w[:, None] * diff - alpha * r) / b).reshape(x0.shape)
    return {
        "grad": grad,
        "weight": w,
        "ref_dist": ref_dist,
        "gap": np.abs(diff).mean(1),
        "surrogate": w * (diff * per_sample(x0)).sum(1),
    }


def huber_terms(x0, d_p, d_q, sigma, c, weighting="sigma2"):
    b = x0.shape[0]
    s2 = (sigma**2)[:, None]
    y = per_sample(d_p - d_q) / s2
    r = per_sample(d_q - x0) / s2
    ysq, yr = (y * y).sum(1), (y * r).sum(1)
    h = np.sqrt(ysq + c * c)
    w = s2[:, 0] if weighting == "sigma2" else np.ones(b)
    scale = (w / (s2[:, 0] * b))[:, None]
    dprime = y / h[:, None]
    ddr = (r - y * (yr / h**2)[:, None]) / h[:, None]
    return {
        "a": (scale * (dprime + ddr)).reshape(x0.shape),
        "b": (scale * ddr).reshape(x0.shape),
        "dprime": (scale * dprime).reshape(x0.shape),
        "ysq": ysq,
        "yr": yr,
        "h": h,
        "value": w * (h - c),
    }


def adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    if weight_decay:
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    return param - lr * mhat / (np.sqrt(vhat) + eps), m, v
