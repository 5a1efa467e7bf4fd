"""Pure-PyTorch reference of every fused kernel (same semantics as csrc/).

The tests compare the C and CUDA kernels with it, and it stands in when a CUDA
tensor arrives but the CUDA library was not built. Reductions run in float64,
element-wise math in float32, so it is a reference, not a bit-exact twin.
The `nonfinite` counts follow csrc/dipp.h: per sample, the elements at which an
input term or an element-wise output, as stored in the output dtype, is non-finite.
"""

from __future__ import annotations

import math

import torch

from . import philox
from .types import GeneratorGrad, HuberTerms, TALoss


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def below_one(dtype: torch.dtype) -> float:
    """The largest value below 1 in dtype: where fill_uniform's draws are clamped (dipp_uniform_in)."""
    one = torch.tensor(1.0, dtype=dtype)
    return float(torch.nextafter(one, torch.zeros_like(one)))


def fill(out: torch.Tensor, seed: int, offset: int, normal: bool) -> torch.Tensor:
    values = philox.stream(seed, offset, out.numel(), normal, out.device)
    if not normal:  # a float32 draw just below 1 would round to 1.0 in float16/bfloat16
        values = values.clamp(max=below_one(out.dtype))
    out.copy_(values.reshape(out.shape))
    return out


def sample_sigma(
    batch: int,
    seed: int,
    offset: int,
    p_mean: float,
    p_std: float,
    sigma_min: float,
    sigma_max: float,
    table: torch.Tensor | None,
    snap: bool,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    normal = philox.stream(seed, offset, batch, True, device)
    sigma = torch.exp(torch.tensor(p_mean, dtype=torch.float32) + torch.tensor(p_std, dtype=torch.float32) * normal)
    sigma = sigma.clamp(min=sigma_min, max=sigma_max)
    index = None
    if table is not None:
        t = table.to(device=device, dtype=torch.float32)
        hi = torch.searchsorted(t, sigma, right=True).clamp(1, t.numel() - 1)
        lo = hi - 1
        pick_lo = (sigma - t[lo]) <= (t[hi] - sigma)
        index = torch.where(pick_lo, lo, hi)
        index = torch.where(sigma <= t[0], torch.zeros_like(index), index)
        index = torch.where(sigma >= t[-1], torch.full_like(index, t.numel() - 1), index)
        if snap:
            sigma = t[index]
    return sigma, index


def add_noise(
    x0: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int, flow: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    eps = philox.stream(seed, offset, x0.numel(), True, x0.device).reshape(x0.shape)
    s = _bcast(sigma.to(torch.float32), x0)
    x = x0.to(torch.float32)
    xt = (1.0 - s) * x + s * eps if flow else x + s * eps
    return xt.to(x0.dtype), eps.to(x0.dtype)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, omega: float) -> torch.Tensor:
    u, c = uncond.to(torch.float32), cond.to(torch.float32)
    return (u + omega * (c - u)).to(uncond.dtype)


def edm_lambda(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def ta_loss(
    d_ta: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor | None,
    weighting: str,
    sigma_data: float,
    reduction: str,
    need_grad: bool,
) -> TALoss:
    batch, n = d_ta.shape[0], d_ta[0].numel()
    diff = _per_sample(d_ta).double() - _per_sample(x0).double()
    if weighting == "edm":
        assert sigma is not None
        weight = edm_lambda(sigma.double(), sigma_data)
    else:
        weight = torch.ones(batch, dtype=torch.float64, device=d_ta.device)
    scale = 1.0 / n if reduction == "mean" else 1.0
    loss = (weight * scale * (diff * diff).sum(dim=1)).float()
    bad = ~torch.isfinite(diff)
    grad = None
    if need_grad:
        grad = (2.0 * (weight * scale / batch)[:, None] * diff).reshape(d_ta.shape).to(d_ta.dtype)
        bad = bad | ~torch.isfinite(_per_sample(grad))
    return TALoss(loss, grad, bad.sum(dim=1))


def generator_grad(
    x0: torch.Tensor,
    d_ta: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    omega: float,
    dr: torch.Tensor | None,
    alpha: float,
    weighting: str,
    min_norm: float,
) -> GeneratorGrad:
    batch = x0.shape[0]
    x = _per_sample(x0).double()
    ta = _per_sample(d_ta).double()
    ref = _per_sample(d_cond).double()
    if d_uncond is not None:
        u = _per_sample(d_uncond).double()
        ref = u + omega * (ref - u)
    diff = ta - ref
    ref_dist = (x - ref).abs().mean(dim=1)
    if weighting == "normalized":
        weight = 1.0 / torch.where(torch.isnan(ref_dist), ref_dist, ref_dist.clamp(min=min_norm))
    else:
        weight = torch.ones_like(ref_dist)
    r = _per_sample(dr).double() if dr is not None else torch.zeros_like(x)
    grad = ((weight[:, None] * diff - alpha * r) / batch).reshape(x0.shape).to(x0.dtype)
    bad = ~(torch.isfinite(x) & torch.isfinite(diff) & torch.isfinite(r) & torch.isfinite(_per_sample(grad)))
    return GeneratorGrad(
        grad,
        weight.float(),
        ref_dist.float(),
        diff.abs().mean(dim=1).float(),
        (weight * (diff * x).sum(dim=1)).float(),
        bad.sum(dim=1),
    )


def huber_terms(
    x0: torch.Tensor, d_p: torch.Tensor, d_q: torch.Tensor, sigma: torch.Tensor, c: float, weighting: str
) -> HuberTerms:
    batch = x0.shape[0]
    s2 = sigma.double()[:, None] ** 2
    y = (_per_sample(d_p).double() - _per_sample(d_q).double()) / s2
    r = (_per_sample(d_q).double() - _per_sample(x0).double()) / s2
    ysq = (y * y).sum(dim=1)
    yr = (y * r).sum(dim=1)
    h = torch.sqrt(ysq + c * c)
    w = s2[:, 0] if weighting == "sigma2" else torch.ones_like(ysq)
    scale = (w / (s2[:, 0] * batch))[:, None]
    dprime = y / h[:, None]
    ddr = (r - y * (yr / h**2)[:, None]) / h[:, None]

    def shaped(v: torch.Tensor) -> torch.Tensor:
        return (scale * v).reshape(x0.shape).to(x0.dtype)

    a, b, d = shaped(dprime + ddr), shaped(ddr), shaped(dprime)
    bad = ~(torch.isfinite(y) & torch.isfinite(r))
    for v in (a, b, d):
        bad = bad | ~torch.isfinite(_per_sample(v))
    return HuberTerms(
        a,
        b,
        d,
        ysq.float(),
        yr.float(),
        h.float(),
        (w * (h - c)).float(),
        bad.sum(dim=1),
    )


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    for e, p in zip(ema, params, strict=True):
        e.copy_((decay * e.float() + (1.0 - decay) * p.float()).to(e.dtype))


@torch.no_grad()
def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor] | None,
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    decoupled: bool,
) -> None:
    if exp_avgs is None and beta1 != 0.0:
        raise ValueError(f"exp_avgs may be None only when beta1 == 0 (got beta1 = {beta1:g})")
    step_size = lr / (1.0 - beta1**step)
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    moments: list[torch.Tensor | None] = list(exp_avgs) if exp_avgs is not None else [None] * len(params)
    for p, g, m_state, v in zip(params, grads, moments, exp_avg_sqs, strict=True):
        pf, gf = p.float(), g.float()
        if weight_decay != 0.0:
            if decoupled:
                pf = pf * (1.0 - lr * weight_decay)
            else:
                gf = gf + weight_decay * pf
        if m_state is None:
            m = gf  # beta1 = 0: torch's first moment is the gradient itself
        else:
            m = m_state.lerp_(gf, 1.0 - beta1)
        v.mul_(beta2).addcmul_(gf, gf, value=1.0 - beta2)
        pf = pf - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
        p.copy_(pf.to(p.dtype))
