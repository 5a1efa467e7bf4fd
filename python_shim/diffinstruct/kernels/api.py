"""Public kernel functions over torch tensors or NumPy arrays; outputs match the inputs' kind.

Each allocates its outputs unless `out=` is given, checks what the C binding
cannot (CUDA sigma values), and runs the C/CUDA kernel or, for CUDA tensors
without a CUDA build, the PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import reference
from .backend import check_cuda_sigma, core, is_torch, plain, plain_out, stream_of, torch, use_reference
from .types import GeneratorGrad, HuberTerms, TALoss

Array = Any  # torch.Tensor or numpy.ndarray


def _empty_like(x: Array) -> Array:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if is_torch(x) else np.empty_like(x)


def _per_sample(x: Array, batch: int, integer: bool = False, rows: int = 0) -> Array:
    """One per-sample vector, or with rows > 0 a [rows, batch] block whose rows are the vectors (one allocation)."""
    shape = (rows, batch) if rows else (batch,)
    if is_torch(x):
        return torch.empty(shape, dtype=torch.int64 if integer else torch.float32, device=x.device)
    return np.empty(shape, dtype=np.int64 if integer else np.float32)


def _batch(x: Array, name: str) -> int:
    if len(x.shape) < 1:
        raise ValueError(f"{name}: expected a batch (at least one dimension), got a scalar")
    return int(x.shape[0])


def fill_uniform(out: Array, seed: int, offset: int = 0) -> Array:
    """Fill `out` with Philox uniforms in (0, 1); element i is lane i%4 of block offset + i//4."""
    if use_reference(out):
        return reference.fill(out, seed, offset, normal=False)
    core.fill_uniform(plain_out(out), seed, offset, stream=stream_of(out))
    return out


def fill_normal(out: Array, seed: int, offset: int = 0) -> Array:
    """Fill `out` with Philox standard normals (Box-Muller on lane pairs)."""
    if use_reference(out):
        return reference.fill(out, seed, offset, normal=True)
    core.fill_normal(plain_out(out), seed, offset, stream=stream_of(out))
    return out


def sigma_table(kind: str, steps: int = 1000, **schedule: float) -> np.ndarray:
    """Sigma by timestep, ascending: 'iddpm_linear' (PixArt/EDM) or 'scaled_linear' (SD1.5)."""
    return core.sigma_table(kind, steps, **schedule)


def sample_sigma(
    batch: int,
    seed: int,
    offset: int = 0,
    *,
    p_mean: float = -2.0,
    p_std: float = 2.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    table: Array | None = None,
    snap: bool = False,
    device: Any = "cpu",
) -> tuple[Array, Array | None]:
    """Per-sample log-normal sigma, clamped; with a table also the nearest index.

    Returns torch tensors on `device` (NumPy arrays if device is None).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if device is None:
        sigma = np.empty(batch, np.float32)
        index = np.empty(batch, np.int64) if table is not None else None
        tab = None if table is None else np.ascontiguousarray(table, dtype=np.float32)
    else:
        sigma = torch.empty(batch, dtype=torch.float32, device=device)
        index = torch.empty(batch, dtype=torch.int64, device=device) if table is not None else None
        tab = None if table is None else torch.as_tensor(np.asarray(table, dtype=np.float32), device=device)
        if tab is not None and tab.is_cuda and not bool(torch.all(tab[1:] > tab[:-1])):
            raise ValueError("table must be strictly ascending")
    if use_reference(sigma):
        return reference.sample_sigma(batch, seed, offset, p_mean, p_std, sigma_min, sigma_max, tab, snap, device)
    core.sample_sigma(plain(sigma), seed, offset, p_mean, p_std, sigma_min, sigma_max, plain(tab), plain(index), snap,
                      stream=stream_of(sigma))
    return sigma, index


def precond(sigma: Array, kind: str = "edm", sigma_data: float = 0.5) -> dict[str, Array]:
    """c_skip, c_out, c_in, c_noise and loss weight per sample (computed on the CPU)."""
    s = sigma.detach().float().cpu().contiguous() if is_torch(sigma) else np.ascontiguousarray(sigma, np.float32)
    outs = {k: _empty_like(s) for k in ("c_skip", "c_out", "c_in", "c_noise", "weight")}
    core.precond(s, *outs.values(), kind=kind, sigma_data=sigma_data)
    if is_torch(sigma):
        return {k: v.to(sigma.device) for k, v in outs.items()}
    return outs


def add_noise(
    x0: Array,
    sigma: Array,
    seed: int,
    offset: int = 0,
    *,
    flow: bool = False,
    return_eps: bool = False,
    out: Array | None = None,
) -> Array | tuple[Array, Array]:
    """x_t = x0 + sigma_b eps (or (1 - sigma_b) x0 + sigma_b eps with flow=True), eps from Philox."""
    _batch(x0, "x0")
    check_cuda_sigma(sigma)
    if use_reference(x0, sigma):
        xt, eps = reference.add_noise(x0, sigma, seed, offset, flow)
        if out is not None:
            out.copy_(xt)
            xt = out
        return (xt, eps) if return_eps else xt
    xt = _empty_like(x0) if out is None else out
    eps = _empty_like(x0) if return_eps else None
    core.add_noise(plain(x0), plain(sigma), plain_out(xt), seed, offset, plain(eps), flow, stream=stream_of(x0))
    return (xt, eps) if return_eps else xt


def cfg_combine(uncond: Array, cond: Array, omega: float, *, out: Array | None = None) -> Array:
    """D_uncond + omega (D_cond - D_uncond); omega = 1 is no guidance."""
    if use_reference(uncond, cond):
        result = reference.cfg_combine(uncond, cond, omega)
        return result if out is None else out.copy_(result)
    result = _empty_like(uncond) if out is None else out
    core.cfg_combine(plain(uncond), plain(cond), plain_out(result), omega, stream=stream_of(uncond))
    return result


def ta_loss(
    d_ta: Array,
    x0: Array,
    sigma: Array | None = None,
    *,
    weighting: str = "edm",
    sigma_data: float = 0.5,
    reduction: str = "mean",
    need_grad: bool = True,
) -> TALoss:
    """Per-sample lambda(sigma) * mean (or sum) (D_TA - x0)^2 and d(mean_b loss_b)/d(D_TA)."""
    batch = _batch(d_ta, "d_ta")
    if sigma is not None:
        check_cuda_sigma(sigma)
    if use_reference(d_ta, x0, sigma):
        if weighting not in ("edm", "unit") or reduction not in ("mean", "sum"):
            raise ValueError("weighting must be 'edm' or 'unit'; reduction 'mean' or 'sum'")
        return reference.ta_loss(d_ta, x0, sigma, weighting, sigma_data, reduction, need_grad)
    loss = _per_sample(d_ta, batch)
    bad = _per_sample(d_ta, batch, integer=True)
    grad = _empty_like(d_ta) if need_grad else None
    core.ta_loss(plain(d_ta), plain(x0), plain(loss), plain(sigma), plain(grad), plain(bad), weighting, sigma_data,
                 reduction, stream=stream_of(d_ta))
    return TALoss(loss, grad, bad)


def generator_grad(
    x0: Array,
    d_ta: Array,
    d_cond: Array,
    *,
    d_uncond: Array | None = None,
    omega: float = 1.0,
    dr: Array | None = None,
    alpha: float = 0.0,
    weighting: str = "normalized",
    min_norm: float = 1e-5,
    out: Array | None = None,
) -> GeneratorGrad:
    """DI++ generator gradient G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B; then x0.backward(G)."""
    batch = _batch(x0, "x0")
    if use_reference(x0, d_ta, d_cond, d_uncond, dr):
        if weighting not in ("normalized", "unit"):
            raise ValueError(f"weighting must be one of unit, normalized, got '{weighting}'")
        result = reference.generator_grad(x0, d_ta, d_cond, d_uncond, omega, dr, alpha, weighting, min_norm)
        return result if out is None else result._replace(grad=out.copy_(result.grad))
    grad = _empty_like(x0) if out is None else out
    diag = list(_per_sample(x0, batch, rows=4))
    bad = _per_sample(x0, batch, integer=True)
    core.generator_grad(plain(x0), plain(d_ta), plain(d_cond), plain_out(grad), *map(plain, diag), plain(bad),
                        plain(d_uncond), omega, plain(dr), alpha, weighting, min_norm, stream=stream_of(x0))
    return GeneratorGrad(grad, *diag, bad)


def huber_terms(
    x0: Array, d_p: Array, d_q: Array, sigma: Array, c: float, *, weighting: str = "sigma2"
) -> HuberTerms:
    """DI* pseudo-Huber pieces; the surrogate sum <a, D_p> - <b, D_q> - <d', x0> has the exact gradient."""
    batch = _batch(x0, "x0")
    check_cuda_sigma(sigma)
    if use_reference(x0, d_p, d_q, sigma):
        return reference.huber_terms(x0, d_p, d_q, sigma, c, weighting)
    vecs = [_empty_like(x0) for _ in range(3)]
    sums = list(_per_sample(x0, batch, rows=4))
    bad = _per_sample(x0, batch, integer=True)
    core.huber_terms(plain(x0), plain(d_p), plain(d_q), plain(sigma), *map(plain, vecs), *map(plain, sums),
                     plain(bad), c, weighting, stream=stream_of(x0))
    return HuberTerms(*vecs, *sums, bad)


def ema_update(ema: Sequence[Array], params: Sequence[Array], decay: float) -> None:
    """In place, over all tensors in one call: ema <- decay ema + (1 - decay) param."""
    if use_reference(*ema, *params):
        reference.ema_update(list(ema), list(params), decay)
        return
    core.ema_update([plain_out(e, "ema") for e in ema], [plain(p) for p in params], decay, stream=stream_of(*ema))


def adam_step(
    params: Sequence[Array],
    grads: Sequence[Array],
    exp_avgs: Sequence[Array] | None,
    exp_avg_sqs: Sequence[Array],
    *,
    lr: float,
    beta1: float = 0.0,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int,
    decoupled: bool = False,
) -> None:
    """One Adam (AdamW with decoupled=True) step over all tensors, in place; step counts from 1.

    exp_avgs=None (only with beta1 = 0) keeps no first moment: torch's is the gradient then.
    """
    if use_reference(*params):
        reference.adam_step(list(params), list(grads), None if exp_avgs is None else list(exp_avgs),
                            list(exp_avg_sqs), lr, beta1, beta2, eps, weight_decay, step, decoupled)
        return
    core.adam_step([plain_out(p, "params") for p in params], [plain(g) for g in grads],
                   None if exp_avgs is None else [plain_out(m, "exp_avgs") for m in exp_avgs],
                   [plain_out(v, "exp_avg_sqs") for v in exp_avg_sqs],
                   lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                   decoupled=decoupled, stream=stream_of(*params))
