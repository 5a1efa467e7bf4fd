"""Public kernel functions over torch tensors or NumPy arrays; outputs match the inputs' kind.

Each checks what only it knows (its Python-only arguments, the kind of every tensor
argument), allocates its outputs unless `out=` is given, and hands the C entry point's
arguments to the one dispatch (ops.run), which runs them on the backend the registry
picks: the C kernels on CPU or CUDA, or the PyTorch reference (for CUDA tensors
without a CUDA build, without the extension, or when forced with use_backend /
DIPP_BACKEND). Every rejection names the argument, in the same words on every
backend: TypeError for a wrong kind of value, ValueError for a bad value,
BufferError for a tensor DLPack cannot carry. Lazily negated inputs
(torch._neg_view) are resolved; outputs must be plain.

The `nonfinite` diagnostic of ta_loss, generator_grad and huber_terms counts, per
sample, the elements at which an input term or an element-wise output (in the output
dtype) is non-finite, each element once: a float16/bfloat16 output that overflows to
Inf from finite inputs counts, and 0 means the sample's element-wise outputs are all
finite. Per-sample outputs (loss, weight, h, ...) are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..checks import is_int
from . import backend
from .backend import core, is_torch, refuse_lazy_output, torch
from .ops import FAST, FAST_TYPES, OPS, fast_cpu, run, run_lists
from .types import GeneratorGrad, HuberTerms, TALoss

_CPU = torch.device("cpu") if torch is not None else None

Array = Any  # torch.Tensor or numpy.ndarray


def _tensor(x: Any, name: str, *, optional: bool = False) -> Any:
    """x itself once it is a dense CPU/CUDA torch.Tensor or a numpy.ndarray (None if optional)."""
    if x is None:
        if optional:
            return None
        raise TypeError(f"{name}: a tensor is required, got None")
    if is_torch(x):
        if x.is_nested or x.layout != torch.strided:
            layout = "nested" if x.is_nested else str(x.layout)
            raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {layout}")
        # is_cpu / is_cuda first: Tensor.device builds a torch.device object (~0.5 us, per tensor of a list)
        if not (x.is_cpu or x.is_cuda) and x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {x.device}")
        return x
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _tensors(seq: Any, name: str) -> list[Any]:
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    strided = None if torch is None else torch.strided
    for i, x in enumerate(seq):
        # the common case (a dense CPU torch tensor) without a call or a label per tensor; the rest as _tensor
        if not (is_torch(x) and x.is_cpu and not x.is_nested and x.layout == strided):
            _tensor(x, f"{name}[{i}]")
    return list(seq)


def _flag(value: Any, name: str) -> bool:
    """True/False (NumPy's too) or the ints 0 and 1; anything else would be read by its truthiness."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be True or False (or 0 or 1), got an int other than 0 and 1")
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _count(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _device(device: Any) -> Any:
    if not (isinstance(device, (str, torch.device)) or is_int(device)):
        raise TypeError(f"device must be a str, int or torch.device (or None for NumPy), got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"device: {error}") from error
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {dev}")
    return dev


def _sigma_values(values: Any, name: str) -> np.ndarray:
    """A float32 NumPy copy of a tensor or sequence of sigma values (a table, precond's sigma); a single
    number, whether a Python, NumPy or 0-d torch scalar, becomes a vector of one."""
    if is_torch(values):
        _tensor(values, name)
    if (values.is_complex() if is_torch(values) else np.iscomplexobj(values)):
        raise TypeError(f"{name}: expected real values, got complex ones")  # float32 would drop the imaginary part
    try:
        if is_torch(values):
            return np.ascontiguousarray(values.detach().resolve_neg().to("cpu", torch.float32).numpy())
        return np.ascontiguousarray(values, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name}: expected a tensor or a sequence of real numbers ({error})") from error


def _empty_like(x: Array) -> Array:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if is_torch(x) else np.empty_like(x)


def _per_sample(x: Array, batch: int, integer: bool = False, rows: int = 0) -> Array:
    """One per-sample vector, or with rows > 0 a [rows, batch] block whose rows are the vectors (one allocation)."""
    shape = (rows, batch) if rows else (batch,)
    if is_torch(x):
        return torch.empty(shape, dtype=torch.int64 if integer else torch.float32, device=x.device)
    return np.empty(shape, dtype=np.int64 if integer else np.float32)


# The fast path of the single-tensor ops (ops.fast_cpu): the outputs as the checked path allocates them, the
# C entry with fast=, and the checked path only when that answers NotImplemented (having written nothing).
_STRIDED = None if torch is None else torch.strided


def _fast_kind(x: Any, batched: bool = True) -> int:
    """1 for a dense CPU tensor of FAST_TYPES, 2 for a NumPy array (with batched: of at least one dimension),
    0 for anything else or when the C kernels do not run the call (else fast_cpu() is FAST)."""
    t = type(x)
    if t is np.ndarray:
        kind = 2
    elif t in FAST_TYPES and x.is_cpu and x.layout == _STRIDED and not x.is_nested and not backend.is_cuda(x):
        kind = 1  # backend.is_cuda: the registry's word on the device (tests let CPU tensors stand for CUDA ones)
    else:
        return 0
    if batched and not x.ndim:
        return 0
    return kind if fast_cpu() is not None else 0


def _fast_like(x: Array, kind: int) -> Array:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if kind == 1 else np.empty_like(x)


def _fast_sample(kind: int, batch: int, integer: bool = False, rows: int = 0) -> Any:
    """_per_sample's outputs; with rows, the rows of one [rows, batch] block (a tuple or list of views)."""
    if kind == 1:  # on the CPU whatever the default device: only CPU tensors take this path
        dtype = torch.int64 if integer else torch.float32
        if rows:
            return torch.empty(rows, batch, dtype=dtype, device=_CPU).unbind(0)
        return torch.empty(batch, dtype=dtype, device=_CPU)
    out = np.empty((rows, batch) if rows else (batch,), dtype=np.int64 if integer else np.float32)
    return list(out) if rows else out


def _batch(x: Array, name: str) -> int:
    _tensor(x, name)
    if len(x.shape) < 1:
        raise ValueError(f"{name}: expected a batch (at least one dimension), got a scalar")
    return int(x.shape[0])


def fill_uniform(out: Array, seed: int, offset: int = 0) -> Array:
    """Fill `out` with Philox uniforms in the open interval (0, 1); element i is lane i%4 of block offset + i//4.

    The bounds hold in every dtype: values are >= 2**-24 and <= the dtype's largest value below 1
    (1 - 2**-24, 1 - 2**-11, 1 - 2**-8 for float32, float16, bfloat16), so a float32 draw that
    would round up to 1.0 in float16/bfloat16 gives that largest value instead.
    """
    if _fast_kind(out, batched=False) and core.fill_uniform(out, seed, offset, fast=FAST) is not NotImplemented:
        return out
    _tensor(out, "out")
    refuse_lazy_output(out, "out")
    run(OPS["fill_uniform"], {"out": out, "seed": seed, "offset": offset})
    return out


def fill_normal(out: Array, seed: int, offset: int = 0) -> Array:
    """Fill `out` with Philox standard normals (Box-Muller on lane pairs)."""
    if _fast_kind(out, batched=False) and core.fill_normal(out, seed, offset, fast=FAST) is not NotImplemented:
        return out
    _tensor(out, "out")
    refuse_lazy_output(out, "out")
    run(OPS["fill_normal"], {"out": out, "seed": seed, "offset": offset})
    return out


def sigma_table(kind: str, steps: int = 1000, **schedule: float) -> np.ndarray:
    """Sigma by timestep, ascending: 'iddpm_linear' (PixArt/EDM) or 'scaled_linear' (SD1.5)."""
    return run(OPS["sigma_table"], {"kind": kind, "steps": steps}, **schedule)


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
    batch = _count(batch, "batch")
    snap = _flag(snap, "snap")
    dev = None if device is None else _device(device)
    tab = None if table is None else _sigma_values(table, "table")
    try:
        if dev is None:
            sigma = np.empty(batch, np.float32)
            index = np.empty(batch, np.int64) if tab is not None else None
        else:
            sigma = torch.empty(batch, dtype=torch.float32, device=dev)
            index = torch.empty(batch, dtype=torch.int64, device=dev) if tab is not None else None
            tab = None if tab is None else torch.as_tensor(tab, device=dev)
    except (RuntimeError, AssertionError, MemoryError, ValueError, OverflowError, TypeError) as error:
        # a batch too large to allocate, or a CUDA device that this torch or machine lacks
        what = f"batch = {batch}" if dev is None or dev.type == "cpu" else f"batch = {batch} on device {dev}"
        raise ValueError(f"{what}: cannot allocate the per-sample outputs ({error})") from error
    run(OPS["sample_sigma"], {"sigma_out": sigma, "seed": seed, "offset": offset, "p_mean": p_mean, "p_std": p_std,
                              "sigma_min": sigma_min, "sigma_max": sigma_max, "table": tab, "index_out": index,
                              "snap": snap})
    return sigma, index


def precond(sigma: Array, kind: str = "edm", sigma_data: float = 0.5) -> dict[str, Array]:
    """c_skip, c_out, c_in, c_noise and loss weight per sample (computed on the CPU)."""
    if sigma is None:
        raise TypeError("sigma: a tensor is required, got None")
    s = _sigma_values(sigma, "sigma")
    outs = {k: _empty_like(s) for k in ("c_skip", "c_out", "c_in", "c_noise", "weight")}
    run(OPS["precond"], {"sigma": s, **outs, "kind": kind, "sigma_data": sigma_data})
    if is_torch(sigma):
        return {k: torch.from_numpy(v).to(sigma.device) for k, v in outs.items()}
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
    """x_t = x0 + sigma_b eps (or (1 - sigma_b) x0 + sigma_b eps with flow=True), eps from Philox.

    out: where x_t goes (the kernel's xt_out); same shape and dtype as x0.
    """
    kind = _fast_kind(x0)
    if kind and type(return_eps) is bool:
        xt = _fast_like(x0, kind) if out is None else out
        eps = _fast_like(x0, kind) if return_eps else None
        if core.add_noise(x0, sigma, xt, seed, offset, eps, flow, fast=FAST) is not NotImplemented:
            return (xt, eps) if return_eps else xt
    _batch(x0, "x0")
    _tensor(sigma, "sigma")
    _tensor(out, "out", optional=True)
    refuse_lazy_output(out, "out")  # named as the caller knows it (the binding's xt_out)
    flow, return_eps = _flag(flow, "flow"), _flag(return_eps, "return_eps")
    xt = _empty_like(x0) if out is None else out
    eps = _empty_like(x0) if return_eps else None
    run(OPS["add_noise"], {"x0": x0, "sigma": sigma, "xt_out": xt, "seed": seed, "offset": offset, "eps_out": eps,
                           "flow": flow})
    return (xt, eps) if return_eps else xt


def cfg_combine(uncond: Array, cond: Array, omega: float, *, out: Array | None = None) -> Array:
    """D_uncond + omega (D_cond - D_uncond); omega = 1 is no guidance."""
    kind = _fast_kind(uncond, batched=False)
    if kind:
        result = _fast_like(uncond, kind) if out is None else out
        if core.cfg_combine(uncond, cond, result, omega, fast=FAST) is not NotImplemented:
            return result
    _tensor(uncond, "uncond")
    _tensor(cond, "cond")
    _tensor(out, "out", optional=True)
    refuse_lazy_output(out, "out")
    result = _empty_like(uncond) if out is None else out
    run(OPS["cfg_combine"], {"uncond": uncond, "cond": cond, "out": result, "omega": omega})
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
    """Per-sample lambda(sigma) * mean (or sum) (D_TA - x0)^2 and d(mean_b loss_b)/d(D_TA).

    nonfinite: per sample, the elements with D_TA - x0 or the gradient (as stored) non-finite.
    """
    kind = _fast_kind(d_ta)
    if kind and type(need_grad) is bool:
        batch = d_ta.shape[0]
        loss, bad = _fast_sample(kind, batch), _fast_sample(kind, batch, integer=True)
        grad = _fast_like(d_ta, kind) if need_grad else None
        if core.ta_loss(d_ta, x0, loss, sigma, grad, bad, weighting, sigma_data, reduction,
                        fast=FAST) is not NotImplemented:
            return TALoss(loss, grad, bad)
    batch = _batch(d_ta, "d_ta")
    _tensor(x0, "x0")
    _tensor(sigma, "sigma", optional=True)
    need_grad = _flag(need_grad, "need_grad")
    loss = _per_sample(d_ta, batch)
    bad = _per_sample(d_ta, batch, integer=True)
    grad = _empty_like(d_ta) if need_grad else None
    run(OPS["ta_loss"], {"d_ta": d_ta, "x0": x0, "loss_out": loss, "sigma": sigma, "grad_out": grad,
                         "nonfinite_out": bad, "weighting": weighting, "sigma_data": sigma_data,
                         "reduction": reduction})
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
    """DI++ generator gradient G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B; then x0.backward(G).

    D_ref^w = D_uncond + omega (D_cond - D_uncond) with d_uncond, else D_cond; so omega other
    than 1 (no guidance) needs d_uncond and raises ValueError without it. out: where G goes
    (the kernel's grad_out). nonfinite: per sample, the elements with x0, D_TA - D_ref, dr or
    the stored G non-finite (G overflowing float16 when W_b sits at its floor counts too).
    """
    kind = _fast_kind(x0)
    if kind:
        batch = x0.shape[0]
        grad = _fast_like(x0, kind) if out is None else out
        diag, bad = _fast_sample(kind, batch, rows=4), _fast_sample(kind, batch, integer=True)
        if core.generator_grad(x0, d_ta, d_cond, grad, *diag, bad, d_uncond, omega, dr, alpha, weighting, min_norm,
                               fast=FAST) is not NotImplemented:
            return GeneratorGrad(grad, *diag, bad)
    batch = _batch(x0, "x0")
    _tensor(d_ta, "d_ta")
    _tensor(d_cond, "d_cond")
    _tensor(d_uncond, "d_uncond", optional=True)
    _tensor(dr, "dr", optional=True)
    _tensor(out, "out", optional=True)
    refuse_lazy_output(out, "out")  # named as the caller knows it (the binding's grad_out)
    grad = _empty_like(x0) if out is None else out
    diag = list(_per_sample(x0, batch, rows=4))
    bad = _per_sample(x0, batch, integer=True)
    run(OPS["generator_grad"], {"x0": x0, "d_ta": d_ta, "d_cond": d_cond, "grad_out": grad, "weight_out": diag[0],
                                "ref_dist_out": diag[1], "gap_out": diag[2], "surrogate_out": diag[3],
                                "nonfinite_out": bad, "d_uncond": d_uncond, "omega": omega, "dr": dr, "alpha": alpha,
                                "weighting": weighting, "min_norm": min_norm})
    return GeneratorGrad(grad, *diag, bad)


def huber_terms(
    x0: Array, d_p: Array, d_q: Array, sigma: Array, c: float, *, weighting: str = "sigma2"
) -> HuberTerms:
    """DI* pseudo-Huber pieces; the surrogate sum <a, D_p> - <b, D_q> - <d', x0> has the exact gradient.

    nonfinite: per sample, the elements with y, r or a stored a, b, d' non-finite.
    """
    kind = _fast_kind(x0)
    if kind:
        batch = x0.shape[0]
        vecs = [_fast_like(x0, kind) for _ in range(3)]
        sums, bad = _fast_sample(kind, batch, rows=4), _fast_sample(kind, batch, integer=True)
        if core.huber_terms(x0, d_p, d_q, sigma, *vecs, *sums, bad, c, weighting,
                            fast=FAST) is not NotImplemented:
            return HuberTerms(*vecs, *sums, bad)
    batch = _batch(x0, "x0")
    _tensor(d_p, "d_p")
    _tensor(d_q, "d_q")
    _tensor(sigma, "sigma")
    vecs = [_empty_like(x0) for _ in range(3)]
    sums = list(_per_sample(x0, batch, rows=4))
    bad = _per_sample(x0, batch, integer=True)
    run(OPS["huber_terms"], {"x0": x0, "d_p": d_p, "d_q": d_q, "sigma": sigma, "a_out": vecs[0], "b_out": vecs[1],
                             "dprime_out": vecs[2], "ysq_out": sums[0], "yr_out": sums[1], "h_out": sums[2],
                             "value_out": sums[3], "nonfinite_out": bad, "c": c, "weighting": weighting})
    return HuberTerms(*vecs, *sums, bad)


def ema_update(ema: Sequence[Array], params: Sequence[Array], decay: float) -> None:
    """In place, over all tensors in one call: ema <- decay ema + (1 - decay) param."""
    if run_lists(OPS["ema_update"], {"ema": ema, "params": params, "decay": decay}):
        return
    ema, params = _tensors(ema, "ema"), _tensors(params, "params")
    run(OPS["ema_update"], {"ema": ema, "params": params, "decay": decay})


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
    args = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "lr": lr,
            "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "step": step,
            "decoupled": decoupled}
    if run_lists(OPS["adam_step"], args):
        return
    params, grads = _tensors(params, "params"), _tensors(grads, "grads")
    exp_avgs = None if exp_avgs is None else _tensors(exp_avgs, "exp_avgs")
    exp_avg_sqs = _tensors(exp_avg_sqs, "exp_avg_sqs")
    decoupled = _flag(decoupled, "decoupled")
    run(OPS["adam_step"], {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                           "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
                           "step": step, "decoupled": decoupled})
