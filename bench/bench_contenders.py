"""The strongest alternatives a user would pick instead of each fused kernel, attached to bench_cases' cases.

- "compile": torch.compile (inductor, CPU, static shapes) of the kernel's formula written in plain torch,
  returning the same outputs as the kernel (per-sample diagnostics and non-finite counts included), float32
  arithmetic on any input dtype, rounded once to the output dtype as the kernel does;
- "adam_fused" / "adam_foreach": torch.optim.Adam(fused=True) / (foreach=True), the state set up as the
  kernel's (step 10, beta1 = 0); bfloat16 parameters keep bfloat16 moments there, as torch creates them;
- "foreach": torch._foreach_lerp_ for the EMA.

The fills have no compiled contender (their alternative is torch's eager generator, the "torch" column).
Every contender runs once on copies of the first buffer set and must agree with the PyTorch reference
(bench_check.contender_agrees) before anything is timed; the first call compiles, the bench's warm-up
calls follow. The same formula object is compiled once; dynamo specialises it per shape and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import bench_cases as cases
import torch
from bench_check import CHECK_TOLERANCE, contender_agrees

CONTENDERS = ("torch", "compile", "adam_fused", "adam_foreach", "foreach")
LABELS = {"torch": "torch eager", "compile": "torch.compile", "adam_fused": "Adam(fused=True)",
          "adam_foreach": "Adam(foreach=True)", "foreach": "_foreach_lerp_"}

torch._dynamo.config.cache_size_limit = 64
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 64
F32 = torch.float32
DIMS = (1, 2, 3)


def _bad(*terms: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(terms[0])
    for t in terms[1:]:
        ok = ok & torch.isfinite(t)
    return (~ok).sum(dim=DIMS)


# ---------------------------------------------------------------------------------------------- formulas


def add_noise_f(x0: torch.Tensor, sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(x0.shape, dtype=F32)
    return (x0.float() + sig * eps).to(x0.dtype), eps.to(x0.dtype)


def cfg_f(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    uf = u.float()
    return (uf + cases.OMEGA * (c.float() - uf)).to(u.dtype)


def ta_f(ta: torch.Tensor, x0: torch.Tensor, lam: torch.Tensor, gfac: torch.Tensor) -> tuple[torch.Tensor, ...]:
    diff = ta.float() - x0.float()
    loss = lam * diff.square().mean(dim=DIMS)
    grad = (gfac * diff).to(ta.dtype)
    return loss, grad, _bad(diff, grad)


def gen_f(x0: torch.Tensor, ta: torch.Tensor, cond: torch.Tensor, unc: torch.Tensor, dr: torch.Tensor | None,
          alpha: float) -> tuple[torch.Tensor, ...]:
    batch = x0.shape[0]
    x, u = x0.float(), unc.float()
    ref = u + cases.OMEGA * (cond.float() - u)
    diff = ta.float() - ref
    ref_dist = (x - ref).abs().mean(dim=DIMS)
    weight = 1.0 / torch.where(torch.isnan(ref_dist), ref_dist, ref_dist.clamp(min=1e-5))
    w = (weight / batch).reshape(-1, 1, 1, 1)
    if dr is None:
        grad = (w * diff).to(x0.dtype)
        bad = _bad(x, diff, grad)
    else:
        r = dr.float()
        grad = (w * diff - (alpha / batch) * r).to(x0.dtype)
        bad = _bad(x, diff, r, grad)
    return grad, weight, ref_dist, diff.abs().mean(dim=DIMS), weight * (diff * x).sum(dim=DIMS), bad


def huber_f(x0: torch.Tensor, dp: torch.Tensor, dq: torch.Tensor, s2: torch.Tensor, c: float
            ) -> tuple[torch.Tensor, ...]:
    batch, dq32 = x0.shape[0], dq.float()
    y = (dp.float() - dq32) / s2
    r = (dq32 - x0.float()) / s2
    ysq = (y * y).sum(dim=DIMS)
    yr = (y * r).sum(dim=DIMS)
    h = torch.sqrt(ysq + c * c)
    hc = h.reshape(-1, 1, 1, 1)
    scale = 1.0 / batch  # sigma2 weighting: w / (sigma^2 B) = 1 / B
    dprime = y / hc
    ddr = (r - y * (yr.reshape(-1, 1, 1, 1) / hc**2)) / hc
    a, b, d = ((scale * v).to(x0.dtype) for v in (dprime + ddr, ddr, dprime))
    return a, b, d, ysq, yr, h, s2.reshape(-1) * (h - c), _bad(y, r, a, b, d)


def ema_f(ema: list[torch.Tensor], params: list[torch.Tensor]) -> None:
    for e, p in zip(ema, params, strict=True):
        e.copy_((cases.DECAY * e.float() + (1.0 - cases.DECAY) * p.float()).to(e.dtype))


def adam_f(params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
           step_size: float, bc2_sqrt: float) -> None:
    b1, b2, eps = cases.ADAM["beta1"], cases.ADAM["beta2"], cases.ADAM["eps"]
    for p, g, m, v in zip(params, grads, ms, vs, strict=True):
        gf = g.float()
        m.lerp_(gf, 1.0 - b1)
        v.mul_(b2).addcmul_(gf, gf, value=1.0 - b2)
        p.copy_((p.float() - step_size * (m / (v.sqrt() / bc2_sqrt + eps))).to(p.dtype))


_FORMULAS = {"add_noise": add_noise_f, "cfg": cfg_f, "ta": ta_f, "gen": gen_f, "huber": huber_f, "ema": ema_f,
             "adam": adam_f}
_COMPILED: dict[str, Callable[..., object]] = {}


def compiled(name: str) -> Callable[..., object]:
    """torch.compile of a formula, made once per process (dynamo then specialises per shape and dtype)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_FORMULAS[name], dynamic=False, fullgraph=True)
    return _COMPILED[name]


# ---------------------------------------------------------------------------------------------- attach


def _noise_check(case: cases.Case, fn: Callable[[dict], object], sig: torch.Tensor) -> Callable[[], None]:
    """add_noise draws its own normals: the compiled xt must be x0 + sigma eps for its own eps, and eps ~ N(0, 1)."""
    def check() -> None:
        d = case.first_set
        xt, eps = fn(d)
        want = (d["x0"].float() + sig * eps.float()).to(xt.dtype)
        rtol, atol = CHECK_TOLERANCE[xt.dtype]
        torch.testing.assert_close(xt.double(), want.double(), rtol=rtol, atol=atol * 4)
        e = eps.double()
        bound = 6.0 / math.sqrt(e.numel())  # six standard errors of the mean (and about of the std)
        if abs(float(e.mean())) > bound or abs(float(e.std()) - 1.0) > bound:
            raise AssertionError(f"{case.kernel} / compile: eps is not standard normal ({float(e.mean())}, "
                                 f"{float(e.std())})")
    return check


def _per_set(case: cases.Case, name: str, make: Callable[[dict], Callable[[], object]],
             run: Callable[[dict], object]) -> None:
    case.impls[name] = [make(d) for d in case.sets]
    case.checks.append(lambda: contender_agrees(case.kernel, name, run, case.run, case.first_set))


def _adam_torch(d: dict, foreach: bool) -> Callable[[], object]:
    """A torch.optim.Adam over d's parameters with d's gradients and state at step 10 (as the kernel's call)."""
    kw = {"fused": True} if not foreach else {"foreach": True}
    a = cases.ADAM
    opt = torch.optim.Adam(d["p"], lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"], **kw)
    for p, g, m, v in zip(d["p"], d["g"], d["m"], d["v"], strict=True):
        p.grad = g
        opt.state[p] = {"step": torch.tensor(float(a["step"] - 1)), "exp_avg": m.to(p.dtype),
                        "exp_avg_sq": v.to(p.dtype)}

    def step() -> object:
        opt.step()
        return d["p"], [opt.state[p]["exp_avg"] for p in d["p"]], [opt.state[p]["exp_avg_sq"] for p in d["p"]]
    return step


def attach(case: cases.Case) -> cases.Case:
    """Adds the contenders of case.kernel to case.impls (one callable per buffer set) and their validations
    to case.checks; returns the case."""
    k = case.kernel
    sigma = case.extra.get("sigma")
    if k.startswith("fill_"):
        return case
    if k.startswith("add_noise"):
        assert isinstance(sigma, torch.Tensor)
        sig = sigma.float().reshape(-1, 1, 1, 1)
        fn = compiled("add_noise")
        case.impls["compile"] = [(lambda d=d: fn(d["x0"], sig)) for d in case.sets]
        case.checks.append(_noise_check(case, lambda d: fn(d["x0"], sig), sig))
        return case
    if k == "cfg_combine":
        fn = compiled("cfg")
        _per_set(case, "compile", lambda d: lambda: fn(d["u"], d["c"]), lambda d: fn(d["u"], d["c"]))
    elif k.startswith("ta_loss"):
        assert isinstance(sigma, torch.Tensor)
        batch, per = case.first_set["ta"].shape[0], case.first_set["ta"][0].numel()
        lam = (sigma.double() ** 2 + cases.SIGMA_DATA**2) / (sigma.double() * cases.SIGMA_DATA) ** 2
        gfac = (2 * lam / (batch * per)).float().reshape(-1, 1, 1, 1)
        lam = lam.float()
        fn = compiled("ta")
        _per_set(case, "compile", lambda d: lambda: fn(d["ta"], d["x0"], lam, gfac),
                 lambda d: fn(d["ta"], d["x0"], lam, gfac))
    elif k.startswith("generator_grad"):
        fn = compiled("gen")
        alpha = cases.ALPHA if "+dr" in k else 0.0

        def gen(d: dict) -> object:
            return fn(d["x0"], d["ta"], d["cond"], d["uncond"], d.get("dr"), alpha)
        _per_set(case, "compile", lambda d: lambda: gen(d), gen)
    elif k == "huber_terms":
        assert isinstance(sigma, torch.Tensor)
        s2 = (sigma.double() ** 2).float().reshape(-1, 1, 1, 1)
        shape = case.first_set["x0"].shape
        c_h = 0.03 * math.sqrt(math.prod(shape[1:]))
        fn = compiled("huber")
        _per_set(case, "compile", lambda d: lambda: fn(d["x0"], d["dp"], d["dq"], s2, c_h),
                 lambda d: fn(d["x0"], d["dp"], d["dq"], s2, c_h))
    elif k.startswith("ema_update"):
        fn = compiled("ema")
        w = 1.0 - cases.DECAY

        def ema_c(d: dict) -> object:
            fn(d["ema"], d["p"])
            return d["ema"]

        def ema_fe(d: dict) -> object:
            torch._foreach_lerp_(d["ema"], d["p"], w)
            return d["ema"]
        _per_set(case, "compile", lambda d: lambda: ema_c(d), ema_c)
        _per_set(case, "foreach", lambda d: lambda: ema_fe(d), ema_fe)
    elif k.startswith("adam_step"):
        fn = compiled("adam")
        a = cases.ADAM
        step_size = a["lr"] / (1.0 - a["beta1"] ** a["step"])
        bc2_sqrt = math.sqrt(1.0 - a["beta2"] ** a["step"])

        def adam_c(d: dict) -> object:
            fn(d["p"], d["g"], d["m"], d["v"], step_size, bc2_sqrt)
            return d["p"], d["m"], d["v"]
        _per_set(case, "compile", lambda d: lambda: adam_c(d), adam_c)
        for name, fe in (("adam_fused", False), ("adam_foreach", True)):
            # the timed optimisers own copies of each set's tensors (their state is replaced in place)
            case.impls[name] = [_adam_torch(_clone(d), fe) for d in case.sets]
            case.checks.append(lambda fe=fe, name=name: contender_agrees(
                k, name, lambda s, fe=fe: _adam_torch(s, fe)(), case.run, case.first_set))
    return case


def _clone(d: dict) -> dict:
    return {key: [t.clone() for t in v] for key, v in d.items()}
