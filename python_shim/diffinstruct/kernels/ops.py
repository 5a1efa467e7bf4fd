"""The op table and the one dispatch: every kernel's C entry, reference and argument checks.

OPS maps an op's name (the public function's and the C entry point's) to its declaration in the
vocabulary of spec.py. run(op, args) takes the entry's arguments by name, asks the registry where
the call runs, and then
- on "cpu": calls the C entry, which checks everything itself;
- on "cuda": checks in Python only what the binding cannot on the device (sigma and table
  values), then calls the same entry;
- on "reference": checks the call as the binding would (validate.py: same type, same message)
  and fills the same outputs from reference.py.
So a bad call fails with the same words wherever it would have run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import backend, reference, registry
from .backend import core, plain, plain_out, refuse_lazy_output, stream_of, to_dlpack, torch
from .scalars import arg_bool, arg_choice, arg_double, arg_i64, arg_u64, f32_finite, f32_positive, fmt_g, in_range
from .spec import F32, I64, IN, INOUT, OUT, Op, Scalar, Tensor, TensorList
from .validate import cuda_values, validate

U64 = arg_u64


def _real(name: str, check: Callable[[str, float], None] | None = None) -> Scalar:
    return Scalar(name, arg_double, check)


# ---------------------------------------------------------------------------------------------- rules


def _sample_sigma_rules(v: dict[str, Any]) -> None:
    if v["sigma_max"] < v["sigma_min"]:
        raise ValueError(f"sigma_max ({fmt_g(v['sigma_max'])}) must be >= sigma_min ({fmt_g(v['sigma_min'])})")
    if v["snap"] and v["table"] is None:
        raise ValueError("snap=True needs a sigma table")
    if v["index_out"] is not None and v["table"] is None:
        raise ValueError("index_out needs a sigma table")


def _ta_loss_rules(v: dict[str, Any]) -> None:
    if v["weighting"] == "edm" and v["sigma"] is None:
        raise ValueError("sigma is required with weighting='edm'")


def _generator_grad_rules(v: dict[str, Any]) -> None:
    # the kernel ignores omega without d_uncond; a guidance scale that silently acts as 1 is a bug
    if v["d_uncond"] is None and v["omega"] != 1.0:
        raise ValueError(f"omega = {fmt_g(v['omega'])} needs d_uncond (the unconditional prediction for the CFG "
                         "reference); without d_uncond omega must be 1 (no guidance)")


def _adam_rules(v: dict[str, Any]) -> None:
    if v["exp_avgs"] is None and v["beta1"] != 0.0:
        raise ValueError(f"exp_avgs may be None only when beta1 == 0 (got beta1 = {fmt_g(v['beta1'])})")


# ---------------------------------------------------------------------------------------------- references
# Each fills the outputs the C entry would fill, from values that validate() parsed.


def _fill(normal: bool) -> Callable[[dict[str, Any]], None]:
    def run(v: dict[str, Any]) -> None:
        reference.fill(v["out"], v["seed"], v["offset"], normal=normal)

    return run


def _sample_sigma(v: dict[str, Any]) -> None:
    out = v["sigma_out"]
    sigma, index = reference.sample_sigma(out.numel(), v["seed"], v["offset"], v["p_mean"], v["p_std"],
                                          v["sigma_min"], v["sigma_max"], v["table"], v["snap"], out.device)
    out.copy_(sigma)
    if v["index_out"] is not None:
        v["index_out"].copy_(index)


def _add_noise(v: dict[str, Any]) -> None:
    xt, eps = reference.add_noise(v["x0"], v["sigma"], v["seed"], v["offset"], v["flow"])
    v["xt_out"].copy_(xt)
    if v["eps_out"] is not None:
        v["eps_out"].copy_(eps)


def _cfg_combine(v: dict[str, Any]) -> None:
    v["out"].copy_(reference.cfg_combine(v["uncond"], v["cond"], v["omega"]))


def _copy_results(v: dict[str, Any], result: Any, names: tuple[str, ...]) -> None:
    for name, value in zip(names, result, strict=True):
        if v[name] is not None:
            v[name].copy_(value)


def _ta_loss(v: dict[str, Any]) -> None:
    res = reference.ta_loss(v["d_ta"], v["x0"], v["sigma"], v["weighting"], v["sigma_data"], v["reduction"],
                            v["grad_out"] is not None)
    _copy_results(v, res, ("loss_out", "grad_out", "nonfinite_out"))


GEN_OUTS = ("grad_out", "weight_out", "ref_dist_out", "gap_out", "surrogate_out", "nonfinite_out")
HUBER_OUTS = ("a_out", "b_out", "dprime_out", "ysq_out", "yr_out", "h_out", "value_out", "nonfinite_out")


def _generator_grad(v: dict[str, Any]) -> None:
    res = reference.generator_grad(v["x0"], v["d_ta"], v["d_cond"], v["d_uncond"], v["omega"], v["dr"], v["alpha"],
                                   v["weighting"], v["min_norm"])
    _copy_results(v, res, GEN_OUTS)


def _huber_terms(v: dict[str, Any]) -> None:
    res = reference.huber_terms(v["x0"], v["d_p"], v["d_q"], v["sigma"], v["c"], v["weighting"])
    _copy_results(v, res, HUBER_OUTS)


def _ema_update(v: dict[str, Any]) -> None:
    reference.ema_update(list(v["ema"]), list(v["params"]), v["decay"])


def _adam_step(v: dict[str, Any]) -> None:
    moments = None if v["exp_avgs"] is None else list(v["exp_avgs"])
    reference.adam_step(list(v["params"]), list(v["grads"]), moments, list(v["exp_avg_sqs"]), v["lr"], v["beta1"],
                        v["beta2"], v["eps"], v["weight_decay"], v["step"], v["decoupled"])


# ---------------------------------------------------------------------------------------------- the table


def _fill_op(name: str, normal: bool) -> Op:
    return Op(name, ("out", "seed", "offset"), (Scalar("seed", U64), Scalar("offset", U64)),
              (Tensor("out", OUT, shape="any"),), reference=_fill(normal))


SIGMA = {"dtypes": F32, "shape": "sample", "values": "sigma"}
PER_SAMPLE = {"role": OUT, "dtypes": F32, "shape": "sample"}
COUNTS = {"role": OUT, "dtypes": I64, "shape": "sample"}

_OPS = [
    _fill_op("fill_uniform", False),
    _fill_op("fill_normal", True),
    Op("sample_sigma",
       ("sigma_out", "seed", "offset", "p_mean", "p_std", "sigma_min", "sigma_max", "table", "index_out", "snap"),
       (Scalar("seed", U64), Scalar("offset", U64), _real("p_mean", f32_finite), _real("p_std", in_range(0.0, 1e6)),
        _real("sigma_min", f32_positive), _real("sigma_max", f32_positive), Scalar("snap", arg_bool)),
       (Tensor("sigma_out", OUT, F32, "vector"), Tensor("table", IN, F32, "table", optional=True),
        Tensor("index_out", OUT, I64, "sample", optional=True)),
       _sample_sigma_rules, _sample_sigma),
    # host-side tables: only the C binding runs (and checks) them, so there is nothing to agree with
    Op("sigma_table", ("kind", "steps"), cuda=False, streamed=False),
    Op("precond", ("sigma", "c_skip", "c_out", "c_in", "c_noise", "weight", "kind", "sigma_data"),
       (Scalar("kind", arg_choice("edm", "eps", "v")), _real("sigma_data", f32_positive)),
       (Tensor("sigma", IN, F32, "vector", values="sigma"),
        *(Tensor(n, **PER_SAMPLE) for n in ("c_skip", "c_out", "c_in", "c_noise", "weight"))),
       cuda=False, streamed=False),
    Op("add_noise", ("x0", "sigma", "xt_out", "seed", "offset", "eps_out", "flow"),
       (Scalar("seed", U64), Scalar("offset", U64), Scalar("flow", arg_bool)),
       (Tensor("x0", shape="batch"), Tensor("sigma", **SIGMA), Tensor("xt_out", OUT, shape="like"),
        Tensor("eps_out", OUT, shape="like", optional=True)),
       reference=_add_noise),
    Op("cfg_combine", ("uncond", "cond", "out", "omega"), (_real("omega", f32_finite),),
       (Tensor("uncond", shape="lead"), Tensor("cond", shape="like"), Tensor("out", OUT, shape="like")),
       reference=_cfg_combine),
    Op("ta_loss",
       ("d_ta", "x0", "loss_out", "sigma", "grad_out", "nonfinite_out", "weighting", "sigma_data", "reduction"),
       (Scalar("weighting", arg_choice("unit", "edm")), Scalar("reduction", arg_choice("sum", "mean")),
        _real("sigma_data", f32_positive)),
       (Tensor("d_ta", shape="batch"), Tensor("x0", shape="like"), Tensor("loss_out", **PER_SAMPLE),
        Tensor("sigma", optional=True, **SIGMA), Tensor("grad_out", OUT, shape="like", optional=True),
        Tensor("nonfinite_out", optional=True, **COUNTS)),
       _ta_loss_rules, _ta_loss),
    Op("generator_grad", ("x0", "d_ta", "d_cond", *GEN_OUTS, "d_uncond", "omega", "dr", "alpha", "weighting",
                          "min_norm"),
       (Scalar("weighting", arg_choice("unit", "normalized")), _real("omega", f32_finite), _real("alpha", f32_finite),
        _real("min_norm", f32_positive)),
       (Tensor("x0", shape="batch"), Tensor("d_ta", shape="like"), Tensor("d_cond", shape="like"),
        Tensor("d_uncond", shape="like", optional=True), Tensor("dr", shape="like", optional=True),
        Tensor("grad_out", OUT, shape="like"), *(Tensor(n, **PER_SAMPLE) for n in GEN_OUTS[1:-1]),
        Tensor("nonfinite_out", **COUNTS)),
       _generator_grad_rules, _generator_grad),
    Op("huber_terms", ("x0", "d_p", "d_q", "sigma", *HUBER_OUTS, "c", "weighting"),
       (Scalar("weighting", arg_choice("unit", "sigma2")), _real("c", f32_positive)),
       (Tensor("x0", shape="batch"), Tensor("d_p", shape="like"), Tensor("d_q", shape="like"),
        Tensor("sigma", **SIGMA), *(Tensor(n, OUT, shape="like") for n in HUBER_OUTS[:3]),
        *(Tensor(n, **PER_SAMPLE) for n in HUBER_OUTS[3:-1]), Tensor("nonfinite_out", **COUNTS)),
       reference=_huber_terms),
    Op("ema_update", ("ema", "params", "decay"), (_real("decay", in_range(0.0, 1.0)),),
       (TensorList("ema", INOUT), TensorList("params")), reference=_ema_update),
    Op("adam_step", ("params", "grads", "exp_avgs", "exp_avg_sqs", "lr", "beta1", "beta2", "eps", "weight_decay",
                     "step", "decoupled"),
       (_real("lr", in_range(0.0, 1e6)), _real("beta1", in_range(0.0, 1.0, hi_open=True)),
        _real("beta2", in_range(0.0, 1.0, hi_open=True)), _real("eps", f32_positive),
        _real("weight_decay", in_range(0.0, 1e6)), Scalar("step", arg_i64(1)), Scalar("decoupled", arg_bool)),
       (TensorList("params", INOUT), TensorList("grads"), TensorList("exp_avgs", INOUT, F32, optional=True),
        TensorList("exp_avg_sqs", INOUT, F32)),
       _adam_rules, _adam_step),
]
OPS: dict[str, Op] = {op.name: op for op in _OPS}


# ---------------------------------------------------------------------------------------------- the dispatch


def _convert_list(seq: Any, name: str, slow: Callable[[Any, str], Any]) -> Any:
    """slow(item, label) for each item; a plain CPU tensor (neither requiring grad nor lazily negated or
    conjugated), for which plain() and plain_out() just export it, takes torch's DLPack export directly,
    without a call or a label per tensor (a failed export is raised again by `slow`, naming the item)."""
    if seq is None:
        return None
    out = []
    for i, x in enumerate(seq):
        if (torch is not None and isinstance(x, torch.Tensor) and x.is_cpu
                and not (x.requires_grad or x.is_neg() or x.is_conj())):
            try:
                out.append(to_dlpack(x))
                continue
            except (RuntimeError, BufferError, TypeError, ValueError):
                pass
        out.append(slow(x, f"{name}[{i}]"))
    return out


def _plain_list(seq: Any, name: str) -> Any:
    return _convert_list(seq, name, plain)


def _plain_out_list(seq: Any, name: str) -> Any:
    return _convert_list(seq, name, plain_out)


# A single output reaches the binding through plain(), which would hand a lazily negated view over as a
# resolved copy and so lose what the kernel writes: the public API allocates those outputs itself or
# refuses such a view of the caller's (refuse_lazy_output) before the dispatch. Items of output lists
# are always the caller's, so each is checked here (plain_out).
_TO_BINDING: dict[str, Callable[[Any, str], Any]] = {"in": plain, "out": plain, "list-in": _plain_list,
                                                    "list-out": _plain_out_list}
_CALLS = {name: tuple((p, _TO_BINDING.get(kind)) for p, kind in op.converters) for name, op in OPS.items()}
# dtypes that torch's DLPack export takes; only others need the C path's export attempt replayed
_EXPORTABLE = () if torch is None else (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                        torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                        torch.complex64, torch.complex128)


def run(op: Op, args: dict[str, Any], **keywords: Any) -> Any:
    """One call of `op` with the C entry's arguments `args` (by name); outputs are written in place.

    keywords go to the C entry as they are (sigma_table's schedule); returns what the entry returns
    (sigma_table's new array; None otherwise)."""
    lead = args[op.lead] if op.lead else None
    where = registry.select(op, lead)
    if where == "reference":
        _run_reference(op, args)
        return None
    if where == "cuda":
        cuda_values(op, args)
    call = [convert(args[name], name) if convert else args[name] for name, convert in _CALLS[op.name]]
    entry = getattr(core, op.name)
    if not op.streamed:
        return entry(*call, **keywords)
    first = lead[0] if isinstance(lead, list) and lead else lead
    return entry(*call, stream=stream_of(first) if where == "cuda" else 0, **keywords)


# The multi-tensor ops' fast path: the lists go to the C entry as they are, with what it needs to read torch
# tensors itself: DLPack's C exchange API of torch.Tensor (no Python call or allocation per tensor), for the
# exact types that share it, torch's to_dlpack for other tensors (or a torch without it), and Tensor.is_neg,
# called per tensor (DLPack cannot carry the sign bit). No Python work, label or kept object per tensor. The
# entry takes a call only when every item is a NumPy array or a plain CPU torch tensor that passes every
# check, and otherwise answers NotImplemented without side effects: then the checked path (run) raises what
# it raises.
def _fast_exporter() -> tuple[Any, ...] | None:
    if torch is None:
        return None
    api = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    types = tuple(t for t in (torch.Tensor, torch.nn.Parameter)
                  if api is not None and getattr(t, "__dlpack_c_exchange_api__", None) is api)
    return api, to_dlpack, torch.Tensor.is_neg, types


_FAST = _fast_exporter()


def run_lists(op: Op, args: dict[str, Any]) -> bool:
    """True when the C entry of a multi-tensor op (ema_update, adam_step) ran the call on its fast path."""
    lead = args[op.lead]
    if _FAST is None or not isinstance(lead, (list, tuple)) or not lead:
        return False
    try:
        if registry.select(op, lead) != "cpu":
            return False
    except Exception:  # noqa: BLE001  (run raises it again, after the checks that come first there)
        return False
    return getattr(core, op.name)(*[args[name] for name, _ in _CALLS[op.name]], fast=_FAST) is not NotImplemented


# The single-tensor ops' fast path (api.py): for a call whose first tensor is a dense CPU tensor of an exact
# type in _FAST[3] or a NumPy array, the public function allocates the outputs and hands every argument to the
# C entry as it is, with fast=: NumPy arrays are read inline and those torch tensors through the exchange API,
# each checked (and Tensor.is_neg called) in C, with no view, label or capsule per tensor. The entry runs the
# call only when the checked path would run it as it is, and otherwise answers NotImplemented having written
# nothing; the public function then takes the checked path (run), which raises what it raises.
FAST_TYPES: tuple[type, ...] = () if _FAST is None or _FAST[0] is None else _FAST[3]
FAST = _FAST


def fast_cpu() -> tuple[Any, ...] | None:
    """fast= for a call whose tensors are on the CPU when the C kernels run it (the reference not forced)."""
    if _FAST is None or not backend.HAVE_EXTENSION:
        return None
    try:
        name = registry.forced()
    except Exception:  # noqa: BLE001  (a bad DIPP_BACKEND: run raises it, after the checks that come first there)
        return None
    return None if name == "reference" else _FAST


def _for_reference(x: Any, name: str, role: str) -> Any:
    """What the reference reads and writes: the caller's storage, detached, with lazy signs resolved
    for inputs; the hand-off errors of the C path (a lazily negated output, a dtype DLPack cannot
    carry) raised at the same point, before any other check."""
    if isinstance(x, (list, tuple)):
        return [_for_reference(item, f"{name}[{i}]", role[5:]) for i, item in enumerate(x)]
    if torch is None or not isinstance(x, torch.Tensor):
        return x
    if role == "out":
        refuse_lazy_output(x, name)
    if x.is_cpu and x.dtype not in _EXPORTABLE:
        plain(x, name)
    x = x.detach()
    return x.resolve_neg().resolve_conj() if x.is_neg() or x.is_conj() else x


def _as_torch(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # a read-only input array: the reference never writes it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    if isinstance(x, list):
        return [_as_torch(item) for item in x]
    return x


def _run_reference(op: Op, args: dict[str, Any]) -> None:
    assert op.reference is not None
    prepared = {name: _for_reference(args[name], name, kind) if kind else args[name]
                for name, kind in op.converters}
    values = validate(op, prepared)
    with torch.no_grad():
        op.reference({k: _as_torch(v) for k, v in values.items()})


def backends() -> dict[str, dict[str, str | None]]:
    """For every op, each backend -> None where it can run the op here, else the reason it cannot.

    It lives beside the table rather than in the registry, which the table imports."""
    return {name: {b: registry.op_reason(b, op) for b in registry.NAMES} for name, op in OPS.items()}
