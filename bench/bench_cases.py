"""Benchmark cases: each fused kernel, the same math in PyTorch eager and in NumPy, and its byte model.

A case builder takes (shape, dtype, nsets) and returns a Case whose `impls` map an implementation name
("c", "torch", "numpy") to a list of zero-argument callables, one per buffer set. Rotating over several
buffer sets whose total size exceeds the last-level cache makes every call read its data from DRAM.
Its `check` runs the fused kernel once on copies of the first buffer set, and the same call on the
PyTorch reference backend, and raises unless the outputs agree: a fast wrong kernel is not timed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from bench_check import against_reference  # noqa: F401  (re-exported: bench/gpu_check_timing.py)

from diffinstruct import kernels as K

Fn = Callable[[], object]

OMEGA = 4.5  # CFG scale of the generator gradient
ALPHA = 0.1  # reward weight (the dr term)
SIGMA_DATA = 0.5
DECAY = 0.999
ADAM = {"lr": 1e-5, "beta1": 0.0, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 10}
N_PARAM_TENSORS = 64


@dataclass
class Case:
    kernel: str
    model: str  # byte model, in terms of n (elements) and s (bytes per element of the dtype)
    nbytes: int  # bytes moved per call by the fused kernel under the model
    set_bytes: int  # bytes of one buffer set (inputs and outputs)
    impls: dict[str, list[Fn] | None] = field(default_factory=dict)
    run: Callable[[object], object] | None = None  # the fused call on one buffer set, returning its outputs
    first_set: object = None
    sets: list = field(default_factory=list)  # every buffer set (bench_contenders builds on them)
    extra: dict[str, object] = field(default_factory=dict)  # per-sample inputs (sigma, ...) of the call
    checks: list[Callable[[], None]] = field(default_factory=list)  # contenders' validations (raise on failure)

    def check(self) -> None:
        """Raises unless the fused kernel, run once on copies of the first buffer set, agrees with the same
        call on the PyTorch reference backend (the llm.c dev/cuda habit: validate, then time), and so does
        every contender attached by bench_contenders."""
        assert self.run is not None, self.kernel
        against_reference(self.kernel, self.run, self.first_set)
        for check in self.checks:
            check()


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _sets(nsets: int, make: Callable[[], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    first = make()
    return [first] + [{k: v.clone() for k, v in first.items()} for _ in range(nsets - 1)]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy()


def _npd(d: dict[str, object]) -> dict[str, object]:
    """The same buffers as NumPy views (tensors and lists of tensors): the binding's zero-overhead path."""
    return {k: [t.numpy() for t in v] if isinstance(v, list) else v.numpy() for k, v in d.items()}


def _impls(sets: list, f32: bool, c: Callable[..., Fn], t: Callable[..., Fn], npy: Callable[..., Fn],
           np_extra: tuple = ()) -> dict[str, list[Fn] | None]:
    """C kernel with torch tensors and with NumPy views of them (float32 only), torch eager, NumPy."""
    return {"c": [c(d) for d in sets], "c_np": [c(_npd(d), *np_extra) for d in sets] if f32 else None,
            "torch": [t(d) for d in sets], "numpy": [npy(d) for d in sets] if f32 else None}


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _col(v: torch.Tensor | np.ndarray, ndim: int) -> torch.Tensor | np.ndarray:
    return v.reshape((-1,) + (1,) * (ndim - 1))


# ---------------------------------------------------------------------------------------------- random fills


def fill_normal(shape: tuple[int, ...], dtype: torch.dtype, nsets: int, normal: bool = True) -> Case:
    n, s = math.prod(shape), _esize(dtype)
    bufs = [torch.empty(shape, dtype=dtype) for _ in range(nsets)]
    rng = np.random.default_rng(0)
    fill = K.fill_normal if normal else K.fill_uniform

    def c(out: torch.Tensor) -> Fn:
        return lambda: fill(out, 1234, 0)

    def t(out: torch.Tensor) -> Fn:
        return (lambda: out.normal_()) if normal else (lambda: out.uniform_())

    def npy(out: np.ndarray) -> Fn:
        if normal:
            return lambda: rng.standard_normal(out=out, dtype=np.float32)
        return lambda: rng.random(out=out, dtype=np.float32)

    f32 = dtype == torch.float32
    return Case(
        "fill_normal" if normal else "fill_uniform", "W out: n*s", n * s, _tbytes(bufs[0]),
        {"c": [c(b) for b in bufs], "c_np": [c(b.numpy()) for b in bufs] if f32 else None,
         "torch": [t(b) for b in bufs], "numpy": [npy(b.numpy()) for b in bufs] if f32 else None},
        run=lambda b: c(b)(), first_set=bufs[0], sets=bufs,
    )


def add_noise(shape: tuple[int, ...], dtype: torch.dtype, nsets: int, with_eps: bool) -> Case:
    n, s, batch = math.prod(shape), _esize(dtype), shape[0]
    gen = torch.Generator().manual_seed(1)
    sigma = torch.rand(batch, generator=gen) * 2 + 0.5

    def make() -> dict[str, torch.Tensor]:
        d = {"x0": _randn(shape, dtype, gen), "xt": torch.empty(shape, dtype=dtype)}
        if with_eps:
            d["eps"] = torch.empty(shape, dtype=dtype)
        return d

    sets = _sets(nsets, make)
    rng = np.random.default_rng(0)
    sig_col, sig_np = sigma.to(dtype).reshape(-1, 1, 1, 1), sigma.numpy().reshape(-1, 1, 1, 1)

    def c(d: dict[str, torch.Tensor], sig: object = sigma) -> Fn:
        return lambda: K.add_noise(d["x0"], sig, 7, 0, out=d["xt"], return_eps=with_eps)

    def t(d: dict[str, torch.Tensor]) -> Fn:
        def run() -> object:
            eps = torch.randn_like(d["x0"])
            return d["x0"] + sig_col * eps, eps
        return run

    def npy(d: dict[str, torch.Tensor]) -> Fn:
        x0 = d["x0"].numpy()

        def run() -> object:
            eps = rng.standard_normal(x0.shape, dtype=np.float32)
            return x0 + sig_np * eps, eps
        return run

    f32 = dtype == torch.float32
    name = "add_noise (+eps)" if with_eps else "add_noise"
    model = "R x0, W xt, W eps: 3*n*s" if with_eps else "R x0, W xt: 2*n*s"
    return Case(
        name, model, (3 if with_eps else 2) * n * s, _tbytes(*sets[0].values()),
        _impls(sets, f32, c, t, npy, (sigma.numpy(),)),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets, extra={"sigma": sigma},
    )


# ---------------------------------------------------------------------------------------------- CFG


def cfg_combine(shape: tuple[int, ...], dtype: torch.dtype, nsets: int) -> Case:
    n, s = math.prod(shape), _esize(dtype)
    gen = torch.Generator().manual_seed(2)
    sets = _sets(nsets, lambda: {"u": _randn(shape, dtype, gen), "c": _randn(shape, dtype, gen),
                                 "out": torch.empty(shape, dtype=dtype)})

    def c(d: dict[str, torch.Tensor]) -> Fn:
        return lambda: K.cfg_combine(d["u"], d["c"], OMEGA, out=d["out"])

    def t(d: dict[str, torch.Tensor]) -> Fn:
        u, cc = d["u"], d["c"]
        return lambda: u + OMEGA * (cc - u)

    def npy(d: dict[str, torch.Tensor]) -> Fn:
        u, cc = d["u"].numpy(), d["c"].numpy()
        return lambda: u + np.float32(OMEGA) * (cc - u)

    f32 = dtype == torch.float32
    return Case(
        "cfg_combine", "R uncond, cond, W out: 3*n*s", 3 * n * s, _tbytes(*sets[0].values()),
        _impls(sets, f32, c, t, npy, ()),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets,
    )


# ---------------------------------------------------------------------------------------------- TA loss


def ta_loss(shape: tuple[int, ...], dtype: torch.dtype, nsets: int) -> Case:
    n, s, batch = math.prod(shape), _esize(dtype), shape[0]
    per = n // batch
    gen = torch.Generator().manual_seed(3)
    sigma = torch.rand(batch, generator=gen) * 2 + 0.1
    sets = _sets(nsets, lambda: {"ta": _randn(shape, dtype, gen), "x0": _randn(shape, dtype, gen)})
    lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    gfac = (2 * lam / (batch * per)).reshape(-1, 1, 1, 1)
    lam_np, gfac_np = lam.numpy(), gfac.numpy()

    def c(d: dict[str, torch.Tensor], sig: object = sigma) -> Fn:
        return lambda: K.ta_loss(d["ta"], d["x0"], sig, weighting="edm", need_grad=True)

    def t(d: dict[str, torch.Tensor]) -> Fn:
        ta, x0 = d["ta"], d["x0"]

        def run() -> object:
            diff = ta - x0
            loss = lam * diff.square().mean(dim=(1, 2, 3))
            return loss, gfac * diff
        return run

    def npy(d: dict[str, torch.Tensor]) -> Fn:
        ta, x0 = d["ta"].numpy(), d["x0"].numpy()

        def run() -> object:
            diff = ta - x0
            loss = lam_np * np.square(diff).mean(axis=(1, 2, 3))
            return loss, gfac_np * diff
        return run

    f32 = dtype == torch.float32
    return Case(
        "ta_loss (grad)", "one pass per chunk: R d_ta, x0 (read again from L1), W grad: 3*n*s", 3 * n * s,
        3 * n * s,
        _impls(sets, f32, c, t, npy, (sigma.numpy(),)),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets, extra={"sigma": sigma},
    )


# ---------------------------------------------------------------------------------------------- generator gradient


def generator_grad(shape: tuple[int, ...], dtype: torch.dtype, nsets: int, with_dr: bool) -> Case:
    n, s, batch = math.prod(shape), _esize(dtype), shape[0]
    gen = torch.Generator().manual_seed(4)

    def make() -> dict[str, torch.Tensor]:
        d = {k: _randn(shape, dtype, gen) for k in ("x0", "ta", "cond", "uncond")}
        if with_dr:
            d["dr"] = _randn(shape, dtype, gen)
        d["G"] = torch.empty(shape, dtype=dtype)
        return d

    sets = _sets(nsets, make)
    alpha = ALPHA if with_dr else 0.0

    def c(d: dict[str, torch.Tensor]) -> Fn:
        return lambda: K.generator_grad(d["x0"], d["ta"], d["cond"], d_uncond=d["uncond"], omega=OMEGA,
                                        dr=d.get("dr"), alpha=alpha, weighting="normalized", out=d["G"])

    def t(d: dict[str, torch.Tensor]) -> Fn:
        x0, ta, cc, u, dr = d["x0"], d["ta"], d["cond"], d["uncond"], d.get("dr")

        def run() -> object:
            ref = u + OMEGA * (cc - u)
            diff = ta - ref
            w = 1.0 / (x0 - ref).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
            return (w * diff - alpha * dr) / batch if dr is not None else (w * diff) / batch
        return run

    def npy(d: dict[str, torch.Tensor]) -> Fn:
        x0, ta, cc, u, dr = (_np(d.get(k)) for k in ("x0", "ta", "cond", "uncond", "dr"))
        om, al, inv_b = np.float32(OMEGA), np.float32(alpha), np.float32(1.0 / batch)

        def run() -> object:
            ref = u + om * (cc - u)
            diff = ta - ref
            w = 1.0 / np.maximum(np.abs(x0 - ref).mean(axis=(1, 2, 3), keepdims=True), np.float32(1e-5))
            return (w * diff - al * dr) * inv_b if dr is not None else (w * diff) * inv_b
        return run

    f32 = dtype == torch.float32
    if with_dr:
        name, model, k = ("generator_grad (CFG, norm, +dr)",
                          "pass 1 R x0, d_ta, d_cond, d_uncond, dr; pass 2 R d_ta, d_cond, d_uncond, dr; W G: 10*n*s",
                          10)
    else:
        name, model, k = ("generator_grad (CFG, norm)",
                          "pass 1 R x0, d_ta, d_cond, d_uncond; pass 2 R d_ta, d_cond, d_uncond; W G: 8*n*s", 8)
    return Case(
        name, model, k * n * s, _tbytes(*sets[0].values()),
        _impls(sets, f32, c, t, npy, ()),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets,
    )


# ---------------------------------------------------------------------------------------------- DI* pseudo-Huber


def huber_terms(shape: tuple[int, ...], dtype: torch.dtype, nsets: int) -> Case:
    n, s, batch = math.prod(shape), _esize(dtype), shape[0]
    gen = torch.Generator().manual_seed(5)
    sigma = torch.rand(batch, generator=gen) * 2 + 0.5
    c_h = 0.03 * math.sqrt(n // batch)
    sets = _sets(nsets, lambda: {k: _randn(shape, dtype, gen) for k in ("x0", "dp", "dq")})
    s2 = (sigma.double() ** 2).float().reshape(-1, 1, 1, 1)
    s2_np = s2.numpy()
    scale_t = 1.0 / batch  # sigma2 weighting: w / (sigma^2 B) = 1 / B

    def c(d: dict[str, torch.Tensor], sig: object = sigma) -> Fn:
        return lambda: K.huber_terms(d["x0"], d["dp"], d["dq"], sig, c_h, weighting="sigma2")

    def t(d: dict[str, torch.Tensor]) -> Fn:
        x0, dp, dq = d["x0"], d["dp"], d["dq"]

        def run() -> object:
            y = (dp - dq) / s2
            r = (dq - x0) / s2
            ysq = (y * y).sum(dim=(1, 2, 3), keepdim=True)
            yr = (y * r).sum(dim=(1, 2, 3), keepdim=True)
            h = torch.sqrt(ysq + c_h * c_h)
            dprime = y / h
            ddr = (r - y * (yr / h**2)) / h
            return scale_t * (dprime + ddr), scale_t * ddr, scale_t * dprime, ysq, yr, h
        return run

    def npy(d: dict[str, torch.Tensor]) -> Fn:
        x0, dp, dq = d["x0"].numpy(), d["dp"].numpy(), d["dq"].numpy()
        sc, cc = np.float32(scale_t), np.float32(c_h * c_h)

        def run() -> object:
            y = (dp - dq) / s2_np
            r = (dq - x0) / s2_np
            ysq = (y * y).sum(axis=(1, 2, 3), keepdims=True)
            yr = (y * r).sum(axis=(1, 2, 3), keepdims=True)
            h = np.sqrt(ysq + cc)
            dprime = y / h
            ddr = (r - y * (yr / h**2)) / h
            return sc * (dprime + ddr), sc * ddr, sc * dprime, ysq, yr, h
        return run

    f32 = dtype == torch.float32
    return Case(
        "huber_terms", "pass 1 R x0, d_p, d_q; pass 2 R x0, d_p, d_q, W a, b, d': 9*n*s", 9 * n * s,
        _tbytes(*sets[0].values()) * 2,
        _impls(sets, f32, c, t, npy, (sigma.numpy(),)),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets, extra={"sigma": sigma},
    )


# ---------------------------------------------------------------------------------------------- EMA, Adam


def _split(n: int) -> list[int]:
    base, rem = divmod(n, N_PARAM_TENSORS)
    return [base + (1 if i < rem else 0) for i in range(N_PARAM_TENSORS)]


def ema_update(shape: tuple[int, ...], dtype: torch.dtype, nsets: int) -> Case:
    n, s = math.prod(shape), _esize(dtype)
    gen = torch.Generator().manual_seed(6)
    sizes = _split(n)
    sets = [{"ema": [_randn((k,), dtype, gen) for k in sizes], "p": [_randn((k,), dtype, gen) for k in sizes]}
            for _ in range(nsets)]

    def c(d: dict[str, list[torch.Tensor]]) -> Fn:
        def step() -> object:
            K.ema_update(d["ema"], d["p"], DECAY)
            return d["ema"]  # what the call updates, for Case.check

        return step

    def t(d: dict[str, list[torch.Tensor]]) -> Fn:
        def run() -> None:
            for e, p in zip(d["ema"], d["p"], strict=True):
                e.lerp_(p, 1.0 - DECAY)
        return run

    def npy(d: dict[str, list[torch.Tensor]]) -> Fn:
        pairs = [(e.numpy(), p.numpy()) for e, p in zip(d["ema"], d["p"], strict=True)]
        dec, one_m = np.float32(DECAY), np.float32(1.0 - DECAY)

        def run() -> None:
            for e, p in pairs:
                e *= dec
                e += one_m * p
        return run

    f32 = dtype == torch.float32
    return Case(
        f"ema_update ({N_PARAM_TENSORS} tensors)", "R ema, param; W ema: 3*n*s", 3 * n * s, 2 * n * s,
        _impls(sets, f32, c, t, npy, ()),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets,
    )


def adam_step(shape: tuple[int, ...], dtype: torch.dtype, nsets: int) -> Case:
    n, s = math.prod(shape), _esize(dtype)
    gen = torch.Generator().manual_seed(7)
    sizes = _split(n)

    def make() -> dict[str, list[torch.Tensor]]:
        return {"p": [_randn((k,), dtype, gen) for k in sizes], "g": [_randn((k,), dtype, gen) for k in sizes],
                "m": [torch.zeros(k) for k in sizes], "v": [torch.rand(k, generator=gen) for k in sizes]}

    sets = [make() for _ in range(nsets)]
    b1, b2, eps, lr, step = ADAM["beta1"], ADAM["beta2"], ADAM["eps"], ADAM["lr"], ADAM["step"]
    step_size = lr / (1.0 - b1**step)
    bc2_sqrt = math.sqrt(1.0 - b2**step)

    def c(d: dict[str, list[torch.Tensor]]) -> Fn:
        def step() -> object:
            K.adam_step(d["p"], d["g"], d["m"], d["v"], **ADAM)
            return d["p"], d["m"], d["v"]  # what the call updates, for Case.check

        return step

    def t(d: dict[str, list[torch.Tensor]]) -> Fn:
        quads = list(zip(d["p"], d["g"], d["m"], d["v"], strict=True))

        def run() -> None:
            for p, g, m, v in quads:
                gf = g.float()
                m.lerp_(gf, 1.0 - b1)
                v.mul_(b2).addcmul_(gf, gf, value=1.0 - b2)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
        return run

    def npy(d: dict[str, list[torch.Tensor]]) -> Fn:
        quads = [tuple(x.numpy() for x in q) for q in zip(d["p"], d["g"], d["m"], d["v"], strict=True)]
        f = np.float32

        def run() -> None:
            for p, g, m, v in quads:
                m += f(1.0 - b1) * (g - m)
                v *= f(b2)
                v += f(1.0 - b2) * g * g
                p -= f(step_size) * (m / (np.sqrt(v) / f(bc2_sqrt) + f(eps)))
        return run

    f32 = dtype == torch.float32
    return Case(
        f"adam_step ({N_PARAM_TENSORS} tensors, beta1=0)",
        "R param, grad (s each), exp_avg, exp_avg_sq (f32); W param (s), exp_avg, exp_avg_sq (f32): n*(3*s + 16)",
        n * (3 * s + 16), n * (2 * s + 8),
        _impls(sets, f32, c, t, npy, ()),
        run=lambda d: c(d)(), first_set=sets[0], sets=sets,
    )


# (builder, extra kwargs, name of the 70%-of-triad target group or None)
BUILDERS: list[tuple[Callable[..., Case], dict[str, object], bool]] = [
    (fill_normal, {}, False),
    (add_noise, {"with_eps": False}, True),
    (add_noise, {"with_eps": True}, True),
    (cfg_combine, {}, True),
    (ta_loss, {}, True),
    (generator_grad, {"with_dr": False}, True),
    (generator_grad, {"with_dr": True}, True),
    (huber_terms, {}, True),
    (ema_update, {}, True),
    (adam_step, {}, True),
]

# bench/bench.py also times fill_uniform (kept out of BUILDERS, which bench/gpu_check_timing.py reads too).
ALL_BUILDERS = BUILDERS[:1] + [(fill_normal, {"normal": False}, False)] + BUILDERS[1:]
