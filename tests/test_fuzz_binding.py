"""Seeded fuzzing of diffinstruct._core and the public kernels API (issue 10).

Every call starts from a valid call of one operation (random shapes, dtypes, NumPy or torch
tensors) and mutates one argument: a wrong type, a bad value, a bad tensor (dtype, shape,
strides, read-only, device, layout, aliasing, lazily negated views, NaN/Inf inside, ...) or
another valid value. Each mutation says what must happen; the outcome must be one of
- a TypeError, ValueError or BufferError (the one the mutation calls for) whose message
  names the mutated argument, or
- a success, only for mutations that keep the call valid, whose outputs match the references
  (diffinstruct.kernels.reference, tests/reference_np.py) within conftest.TOLERANCES.

Calls run in batches in worker subprocesses, so a crash (segfault, abort) is caught and its
reproducer printed. Run or replay outside pytest:
    python tests/test_fuzz_binding.py --calls 2000          # fuzz, print the summary
    python tests/test_fuzz_binding.py --replay SEED INDEX    # one call, with its arguments
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import TOLERANCES
from diffinstruct import _core
from diffinstruct import kernels as K
from diffinstruct.kernels import reference as tref

SEED = 20240610
CALLS = 10_000
WORKERS = 4  # subprocesses, run one after another

F32_MAX = float(np.finfo(np.float32).max)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
NUMPY_DTYPES = (torch.float32, torch.float16, torch.int64)
SAMPLE_SHAPES = ((5,), (1,), (2, 3), (33,))
ANY_SHAPES = ((7,), (1,), (2, 3), (33,), (4, 1, 5))
EXPECT = {"TE": (TypeError,), "VE": (ValueError,), "BE": (BufferError,), "REJ": (TypeError, ValueError, BufferError)}
OUT_ALIASES = {"api.add_noise": ("xt_out",), "api.generator_grad": ("grad_out",)}


class Mismatch(AssertionError):
    """A call that succeeded but should not have, or whose outputs differ from the reference."""


# --------------------------------------------------------------------------- argument specs


def f32_finite(v: float, kw: dict) -> bool:
    return math.isfinite(v) and abs(v) <= F32_MAX


def f32_positive(v: float, kw: dict) -> bool:
    return f32_finite(v, kw) and v > 0 and float(np.float32(v)) > 0


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[float, dict], bool]:
    def check(v: float, kw: dict) -> bool:
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return check


def always(v: Any, kw: dict) -> bool:
    return True


@dataclass
class Arg:
    kind: str  # tensor | list | real | u64 | int | choice | flag | device
    role: str = "in"  # tensors, lists: in | out | inout
    dtype: str = "group"  # tensors: group (the call's dtype) | own (any float) | f32 | i64
    shape: str = "group"  # tensors: group | sample | source (a [B] vector that sets B) | any | table
    none_ok: Callable[[dict], bool] | None = None  # None is a valid value when this says so
    valid: Callable[[Any, dict], bool] = always  # scalars: is this value acceptable in this call?
    plausible: tuple[float, float] = (0.5, 2.0)  # scalars: range of the "other valid value" mutation
    choices: tuple[str, ...] = ()
    lo: int = 0
    special: str = ""  # tensors: sigma | table | converted (the API copies it into float32)


def REAL(valid: Callable = f32_finite, plausible: tuple[float, float] = (-2.0, 2.0), none_ok: Any = None) -> Arg:
    return Arg("real", valid=valid, plausible=plausible, none_ok=none_ok)


def INT(lo: int, hi: int, plausible: tuple[int, int]) -> Arg:
    return Arg("int", lo=lo, valid=lambda v, kw: lo <= v <= hi, plausible=plausible)


def TENSOR(role: str = "in", dtype: str = "group", shape: str = "group", none_ok: Any = None, special: str = "") -> Arg:
    return Arg("tensor", role=role, dtype=dtype, shape=shape, none_ok=none_ok, special=special)


def OPTIONAL(**kwargs: Any) -> Arg:
    return TENSOR(none_ok=lambda kw: True, **kwargs)


U64 = Arg("u64")


def CHOICE(*choices: str, valid: Callable = always) -> Arg:
    return Arg("choice", choices=choices, valid=valid)


def FLAG(valid: Callable = always) -> Arg:
    return Arg("flag", valid=valid)


@dataclass
class Call:
    op: str  # core.<fn> or api.<fn>
    kwargs: dict[str, Any]
    spec: dict[str, Arg]
    dtype: torch.dtype


# --------------------------------------------------------------------------- valid calls


class Gen:
    """Random valid arguments for one call, from the call's own seed."""

    def __init__(self, rng: np.random.Generator, api: bool) -> None:
        self.rng, self.api = rng, api
        self.dtype = FLOATS[int(rng.integers(3))]
        self.batch = int(rng.integers(1, 4))
        self.sample = SAMPLE_SHAPES[int(rng.integers(len(SAMPLE_SHAPES)))]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.sample)

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options: Any) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def kind(self, t: torch.Tensor) -> Any:
        """Sometimes a NumPy array instead (the binding takes both; the API too, but less often)."""
        if t.dtype in NUMPY_DTYPES and self.chance(0.1 if self.api else 0.25):
            return t.numpy()
        return t

    def tensor(self, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None, lo: float = -1.5,
               hi: float = 1.5) -> Any:
        shape = self.shape if shape is None else shape
        values = torch.from_numpy(self.rng.uniform(lo, hi, size=shape))
        return self.kind(values.to(self.dtype if dtype is None else dtype))

    def out(self, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Any:
        """An output pre-filled with a sentinel, so that an element left unwritten shows."""
        dtype = self.dtype if dtype is None else dtype
        fill = -7 if dtype == torch.int64 else 7.25
        return self.kind(torch.full(self.shape if shape is None else shape, fill, dtype=dtype))

    def sigma(self) -> Any:
        return self.tensor((self.batch,), torch.float32, 0.3, 2.5)

    def u64(self) -> int:
        return int(self.rng.integers(0, 2**62)) * 4 + int(self.rng.integers(0, 4))

    def offset(self) -> int:
        return int(self.rng.integers(0, 2**40))

    def table(self) -> Any:
        return self.kind(torch.from_numpy(np.sort(self.rng.uniform(0.01, 100.0, 16)).astype(np.float32)))


def _with_stream(kw: dict, spec: dict) -> tuple[dict, dict]:
    return {**kw, "stream": 0}, {**spec, "stream": U64}


SIGMA_MIN = REAL(lambda v, kw: f32_positive(v, kw) and v <= kw["sigma_max"], (1e-3, 1.0))
SIGMA_MAX = REAL(lambda v, kw: f32_positive(v, kw) and v >= kw["sigma_min"], (1.0, 100.0))
POSITIVE = REAL(f32_positive, (0.05, 2.0))


def _gen_omega_ok(v: float, kw: dict) -> bool:
    return f32_finite(v, kw) and (kw["d_uncond"] is not None or v == 1.0)


def _adam_beta1_ok(v: float, kw: dict) -> bool:
    return in_range(0.0, 1.0, hi_open=True)(v, kw) and (kw["exp_avgs"] is not None or v == 0.0)


def _adam_lists(g: Gen) -> dict[str, list]:
    shapes = [g.pick(ANY_SHAPES) for _ in range(int(g.rng.integers(1, 4)))]
    dtypes = [g.pick(FLOATS) for _ in shapes]
    return {
        "params": [g.tensor(s, d) for s, d in zip(shapes, dtypes, strict=True)],
        "grads": [g.tensor(s, g.pick(FLOATS)) for s in shapes],
        "exp_avgs": [g.tensor(s, torch.float32) for s in shapes],
        "exp_avg_sqs": [g.tensor(s, torch.float32, 0.0, 1.0) for s in shapes],
    }


ADAM_SPEC = {
    "params": Arg("list", role="inout", dtype="own"),
    "grads": Arg("list", dtype="own"),
    "exp_avgs": Arg("list", role="inout", dtype="f32", none_ok=lambda kw: float(kw["beta1"]) == 0.0),
    "exp_avg_sqs": Arg("list", role="inout", dtype="f32"),
    "lr": REAL(in_range(0.0, 1e6), (1e-4, 0.1)),
    "beta1": REAL(_adam_beta1_ok, (0.0, 0.99)),
    "beta2": REAL(in_range(0.0, 1.0, hi_open=True), (0.9, 0.9999)),
    "eps": REAL(f32_positive, (1e-10, 1e-6)),
    "weight_decay": REAL(in_range(0.0, 1e6), (0.0, 0.1)),
    "step": INT(1, 2**63 - 1, (1, 1000)),
    "decoupled": FLAG(),
}


def _adam_scalars(g: Gen) -> dict[str, Any]:
    return {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": g.pick([0.0, 0.01]),
            "step": int(g.rng.integers(1, 50)), "decoupled": g.chance(0.5)}


def core_fill(g: Gen, normal: bool) -> tuple[dict, dict]:
    kw = {"out": g.out(g.pick(ANY_SHAPES)), "seed": g.u64(), "offset": g.offset()}
    return _with_stream(kw, {"out": TENSOR("out", "own", "any"), "seed": U64, "offset": U64})


def core_sample_sigma(g: Gen) -> tuple[dict, dict]:
    table = g.table() if g.chance(0.7) else None
    kw = {"sigma_out": g.out((g.batch,), torch.float32), "seed": g.u64(), "offset": g.offset(), "p_mean": -1.2,
          "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0, "table": table,
          "index_out": g.out((g.batch,), torch.int64) if table is not None and g.chance(0.7) else None,
          "snap": table is not None and g.chance(0.5)}
    spec = {"sigma_out": TENSOR("out", "f32", "source"), "seed": U64, "offset": U64, "p_mean": REAL(),
            "p_std": REAL(in_range(0.0, 1e6), (0.0, 3.0)), "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
            "table": TENSOR("in", "f32", "table", lambda kw: not kw["snap"] and kw["index_out"] is None, "table"),
            "index_out": OPTIONAL(role="out", dtype="i64", shape="sample"),
            "snap": FLAG(lambda v, kw: not v or kw["table"] is not None)}
    return _with_stream(kw, spec)


def _table_kw(g: Gen) -> tuple[dict, dict]:
    kind = g.pick(("iddpm_linear", "scaled_linear"))
    kw = {"kind": kind, "steps": int(g.rng.integers(2, 40)),
          "beta_start": g.pick([None, 1e-4, 0.00085]), "beta_end": g.pick([None, 0.012, 0.02]), "clip": 1e-3}
    beta = REAL(in_range(0.0, 1.0, True, True), (1e-4, 0.02), none_ok=lambda kw: True)
    spec = {"kind": CHOICE("iddpm_linear", "scaled_linear"), "steps": INT(2, 10**8, (2, 60)), "beta_start": beta,
            "beta_end": beta, "clip": REAL(in_range(0.0, 1.0, lo_open=True), (1e-4, 1e-2))}
    return kw, spec


def core_precond(g: Gen) -> tuple[dict, dict]:
    outs = ("c_skip", "c_out", "c_in", "c_noise", "weight")
    kw = {"sigma": g.sigma(), **{k: g.out((g.batch,), torch.float32) for k in outs},
          "kind": g.pick(("edm", "eps", "v")), "sigma_data": 0.5}
    spec = {"sigma": TENSOR("in", "f32", "source", special="sigma"),
            **{k: TENSOR("out", "f32", "sample") for k in outs}, "kind": CHOICE("edm", "eps", "v"),
            "sigma_data": POSITIVE}
    return kw, spec


def core_add_noise(g: Gen) -> tuple[dict, dict]:
    kw = {"x0": g.tensor(), "sigma": g.sigma(), "xt_out": g.out(), "seed": g.u64(), "offset": g.offset(),
          "eps_out": g.out() if g.chance(0.5) else None, "flow": g.chance(0.3)}
    spec = {"x0": TENSOR(), "sigma": TENSOR("in", "f32", "sample", special="sigma"), "xt_out": TENSOR("out"),
            "seed": U64, "offset": U64, "eps_out": OPTIONAL(role="out"), "flow": FLAG()}
    return _with_stream(kw, spec)


def core_cfg_combine(g: Gen) -> tuple[dict, dict]:
    kw = {"uncond": g.tensor(), "cond": g.tensor(), "out": g.out(), "omega": float(g.pick([1.0, 1.5, 4.5, -0.5]))}
    return _with_stream(kw, {"uncond": TENSOR(), "cond": TENSOR(), "out": TENSOR("out"), "omega": REAL()})


def core_ta_loss(g: Gen) -> tuple[dict, dict]:
    weighting = g.pick(("edm", "unit"))
    kw = {"d_ta": g.tensor(), "x0": g.tensor(), "loss_out": g.out((g.batch,), torch.float32),
          "sigma": g.sigma() if weighting == "edm" or g.chance(0.5) else None,
          "grad_out": g.out() if g.chance(0.8) else None,
          "nonfinite_out": g.out((g.batch,), torch.int64) if g.chance(0.8) else None,
          "weighting": weighting, "sigma_data": 0.5, "reduction": g.pick(("mean", "sum"))}
    spec = {"d_ta": TENSOR(), "x0": TENSOR(), "loss_out": TENSOR("out", "f32", "sample"),
            "sigma": TENSOR("in", "f32", "sample", lambda kw: kw["weighting"] == "unit", "sigma"),
            "grad_out": OPTIONAL(role="out"), "nonfinite_out": OPTIONAL(role="out", dtype="i64", shape="sample"),
            "weighting": CHOICE("unit", "edm", valid=lambda v, kw: v == "unit" or kw["sigma"] is not None),
            "sigma_data": POSITIVE, "reduction": CHOICE("sum", "mean")}
    return _with_stream(kw, spec)


def core_generator_grad(g: Gen) -> tuple[dict, dict]:
    cfg = g.chance(0.6)
    kw = {"x0": g.tensor(), "d_ta": g.tensor(), "d_cond": g.tensor(), "grad_out": g.out(),
          **{k: g.out((g.batch,), torch.float32) for k in ("weight_out", "ref_dist_out", "gap_out", "surrogate_out")},
          "nonfinite_out": g.out((g.batch,), torch.int64), "d_uncond": g.tensor() if cfg else None,
          "omega": 3.0 if cfg else 1.0, "dr": g.tensor() if g.chance(0.5) else None,
          "alpha": float(g.pick([0.0, 0.25])), "weighting": g.pick(("unit", "normalized")), "min_norm": 1e-5}
    spec = {"x0": TENSOR(), "d_ta": TENSOR(), "d_cond": TENSOR(), "grad_out": TENSOR("out"),
            **{k: TENSOR("out", "f32", "sample") for k in ("weight_out", "ref_dist_out", "gap_out", "surrogate_out")},
            "nonfinite_out": TENSOR("out", "i64", "sample"),
            "d_uncond": TENSOR(none_ok=lambda kw: float(kw["omega"]) == 1.0), "omega": REAL(_gen_omega_ok),
            "dr": OPTIONAL(), "alpha": REAL(), "weighting": CHOICE("unit", "normalized"),
            "min_norm": REAL(f32_positive, (1e-6, 1e-3))}
    return _with_stream(kw, spec)


def core_huber_terms(g: Gen) -> tuple[dict, dict]:
    vecs, sums = ("a_out", "b_out", "dprime_out"), ("ysq_out", "yr_out", "h_out", "value_out")
    kw = {"x0": g.tensor(), "d_p": g.tensor(), "d_q": g.tensor(), "sigma": g.sigma(),
          **{k: g.out() for k in vecs}, **{k: g.out((g.batch,), torch.float32) for k in sums},
          "nonfinite_out": g.out((g.batch,), torch.int64), "c": 0.3, "weighting": g.pick(("unit", "sigma2"))}
    spec = {"x0": TENSOR(), "d_p": TENSOR(), "d_q": TENSOR(), "sigma": TENSOR("in", "f32", "sample", special="sigma"),
            **{k: TENSOR("out") for k in vecs}, **{k: TENSOR("out", "f32", "sample") for k in sums},
            "nonfinite_out": TENSOR("out", "i64", "sample"), "c": POSITIVE, "weighting": CHOICE("unit", "sigma2")}
    return _with_stream(kw, spec)


def core_ema_update(g: Gen) -> tuple[dict, dict]:
    shapes = [g.pick(ANY_SHAPES) for _ in range(int(g.rng.integers(1, 4)))]
    kw = {"ema": [g.tensor(s, g.pick(FLOATS)) for s in shapes], "params": [g.tensor(s, g.pick(FLOATS)) for s in shapes],
          "decay": 0.99}
    spec = {"ema": Arg("list", role="inout", dtype="own"), "params": Arg("list", dtype="own"),
            "decay": REAL(in_range(0.0, 1.0), (0.0, 1.0))}
    return _with_stream(kw, spec)


def core_adam_step(g: Gen) -> tuple[dict, dict]:
    return _with_stream({**_adam_lists(g), **_adam_scalars(g)}, ADAM_SPEC)


def core_stream(g: Gen, triad: bool) -> tuple[dict, dict]:
    shape = g.pick(ANY_SHAPES)
    kw = {"a": g.out(shape, torch.float32), "b": g.tensor(shape, torch.float32)}
    spec = {"a": TENSOR("out", "f32"), "b": TENSOR("in", "f32")}
    if triad:
        kw.update(c=g.tensor(shape, torch.float32), scalar=3.0)
        spec.update(c=TENSOR("in", "f32"), scalar=REAL())
    return kw, spec


def api_fill(g: Gen) -> tuple[dict, dict]:
    return ({"out": g.out(g.pick(ANY_SHAPES)), "seed": g.u64(), "offset": g.offset()},
            {"out": TENSOR("out", "own", "any"), "seed": U64, "offset": U64})


def api_sample_sigma(g: Gen) -> tuple[dict, dict]:
    table = g.table() if g.chance(0.5) else None
    kw = {"batch": g.batch, "seed": g.u64(), "offset": g.offset(), "p_mean": -1.2, "p_std": 1.2,
          "sigma_min": 0.002, "sigma_max": 80.0, "table": table, "snap": table is not None and g.chance(0.5),
          "device": g.pick(["cpu", None])}
    spec = {"batch": INT(1, 2**40, (1, 5)), "seed": U64, "offset": U64, "p_mean": REAL(),
            "p_std": REAL(in_range(0.0, 1e6), (0.0, 3.0)), "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
            "table": TENSOR("in", "f32", "table", lambda kw: not kw["snap"], "converted"),
            "snap": FLAG(lambda v, kw: not v or kw["table"] is not None), "device": Arg("device")}
    return kw, spec


def api_precond(g: Gen) -> tuple[dict, dict]:
    return ({"sigma": g.sigma(), "kind": g.pick(("edm", "eps", "v")), "sigma_data": 0.5},
            {"sigma": TENSOR("in", "f32", "source", special="converted"), "kind": CHOICE("edm", "eps", "v"),
             "sigma_data": POSITIVE})


def api_add_noise(g: Gen) -> tuple[dict, dict]:
    kw = {"x0": g.tensor(), "sigma": g.sigma(), "seed": g.u64(), "offset": g.offset(), "flow": g.chance(0.3),
          "return_eps": g.chance(0.5), "out": g.out() if g.chance(0.3) else None}
    spec = {"x0": TENSOR(), "sigma": TENSOR("in", "f32", "sample", special="sigma"), "seed": U64, "offset": U64,
            "flow": FLAG(), "return_eps": FLAG(), "out": OPTIONAL(role="out")}
    return kw, spec


def api_cfg_combine(g: Gen) -> tuple[dict, dict]:
    kw = {"uncond": g.tensor(), "cond": g.tensor(), "omega": 2.0, "out": g.out() if g.chance(0.3) else None}
    return kw, {"uncond": TENSOR(), "cond": TENSOR(), "omega": REAL(), "out": OPTIONAL(role="out")}


def api_ta_loss(g: Gen) -> tuple[dict, dict]:
    weighting = g.pick(("edm", "unit"))
    kw = {"d_ta": g.tensor(), "x0": g.tensor(), "sigma": g.sigma() if weighting == "edm" or g.chance(0.5) else None,
          "weighting": weighting, "sigma_data": 0.5, "reduction": g.pick(("mean", "sum")), "need_grad": g.chance(0.8)}
    spec = {"d_ta": TENSOR(), "x0": TENSOR(),
            "sigma": TENSOR("in", "f32", "sample", lambda kw: kw["weighting"] == "unit", "sigma"),
            "weighting": CHOICE("unit", "edm", valid=lambda v, kw: v == "unit" or kw["sigma"] is not None),
            "sigma_data": POSITIVE, "reduction": CHOICE("sum", "mean"), "need_grad": FLAG()}
    return kw, spec


def api_generator_grad(g: Gen) -> tuple[dict, dict]:
    cfg = g.chance(0.6)
    kw = {"x0": g.tensor(), "d_ta": g.tensor(), "d_cond": g.tensor(), "d_uncond": g.tensor() if cfg else None,
          "omega": 3.0 if cfg else 1.0, "dr": g.tensor() if g.chance(0.5) else None,
          "alpha": float(g.pick([0.0, 0.25])), "weighting": g.pick(("unit", "normalized")), "min_norm": 1e-5,
          "out": g.out() if g.chance(0.3) else None}
    spec = {"x0": TENSOR(), "d_ta": TENSOR(), "d_cond": TENSOR(),
            "d_uncond": TENSOR(none_ok=lambda kw: float(kw["omega"]) == 1.0), "omega": REAL(_gen_omega_ok),
            "dr": OPTIONAL(), "alpha": REAL(), "weighting": CHOICE("unit", "normalized"),
            "min_norm": REAL(f32_positive, (1e-6, 1e-3)), "out": OPTIONAL(role="out")}
    return kw, spec


def api_huber_terms(g: Gen) -> tuple[dict, dict]:
    kw = {"x0": g.tensor(), "d_p": g.tensor(), "d_q": g.tensor(), "sigma": g.sigma(), "c": 0.3,
          "weighting": g.pick(("unit", "sigma2"))}
    spec = {"x0": TENSOR(), "d_p": TENSOR(), "d_q": TENSOR(), "sigma": TENSOR("in", "f32", "sample", special="sigma"),
            "c": POSITIVE, "weighting": CHOICE("unit", "sigma2")}
    return kw, spec


def api_ema_update(g: Gen) -> tuple[dict, dict]:
    kw, spec = core_ema_update(g)
    del kw["stream"], spec["stream"]
    return kw, spec


def api_adam_step(g: Gen) -> tuple[dict, dict]:
    return {**_adam_lists(g), **_adam_scalars(g)}, ADAM_SPEC


BUILDERS: dict[str, Callable[[Gen], tuple[dict, dict]]] = {
    "core.fill_uniform": lambda g: core_fill(g, False),
    "core.fill_normal": lambda g: core_fill(g, True),
    "core.sample_sigma": core_sample_sigma,
    "core.sigma_table": _table_kw,
    "core.precond": core_precond,
    "core.add_noise": core_add_noise,
    "core.cfg_combine": core_cfg_combine,
    "core.ta_loss": core_ta_loss,
    "core.generator_grad": core_generator_grad,
    "core.huber_terms": core_huber_terms,
    "core.ema_update": core_ema_update,
    "core.adam_step": core_adam_step,
    "core.stream_copy": lambda g: core_stream(g, False),
    "core.stream_triad": lambda g: core_stream(g, True),
    "api.fill_uniform": api_fill,
    "api.fill_normal": api_fill,
    "api.sample_sigma": api_sample_sigma,
    "api.sigma_table": _table_kw,
    "api.precond": api_precond,
    "api.add_noise": api_add_noise,
    "api.cfg_combine": api_cfg_combine,
    "api.ta_loss": api_ta_loss,
    "api.generator_grad": api_generator_grad,
    "api.huber_terms": api_huber_terms,
    "api.ema_update": api_ema_update,
    "api.adam_step": api_adam_step,
}


# --------------------------------------------------------------------------- mutations


@dataclass
class Mutation:
    arg: str  # the argument's name (a list's name for one of its items)
    label: str
    make: Callable[[], Any]
    expect: str  # TE | VE | BE | REJ (any of the three) | OK (must succeed) | ANY (either)


def _numpy_ok(t: Any) -> bool:
    return isinstance(t, np.ndarray) or (isinstance(t, torch.Tensor) and t.dtype in NUMPY_DTYPES)


def _torch(t: Any) -> torch.Tensor:
    return torch.from_numpy(t.copy()) if isinstance(t, np.ndarray) else t.detach().clone()


def _like(t: Any, values: torch.Tensor) -> Any:
    """values in the kind (NumPy or torch) of t."""
    return values.numpy() if isinstance(t, np.ndarray) else values


def _strided(t: torch.Tensor) -> torch.Tensor:
    full = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]) if t.dim() else (2,), dtype=t.dtype)
    view = full[..., ::2]
    view.copy_(t.reshape(view.shape))
    return view


def _read_only(t: Any) -> np.ndarray:
    a = np.array(_torch(t).numpy())
    a.flags.writeable = False
    return a


class RaisingProducer:
    """A DLPack producer whose __dlpack__ fails."""

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise RuntimeError("producer failure")


def _with_value(t: Any, value: float, rng: np.random.Generator) -> Any:
    v = _torch(t)
    flat = v.reshape(-1)
    flat[int(rng.integers(flat.numel()))] = value
    return _like(t, v)


def tensor_mutations(call: Call, name: str, arg: Arg, t: Any, rng: np.random.Generator) -> list[Mutation]:
    core, out = call.op.startswith("core."), arg.role != "in"
    converted = arg.special == "converted"
    base = _torch(t)
    is_float = base.is_floating_point()
    muts: list[Mutation] = []

    def add(label: str, make: Callable[[], Any], expect: str) -> None:
        muts.append(Mutation(name, label, make, expect))

    none_expect = "TE" if arg.none_ok is None else ("OK" if arg.none_ok(call.kwargs) else "VE")
    add("none", lambda: None, none_expect)
    add("list", lambda: base.tolist(), "OK" if converted else "TE")
    add("int", lambda: 3, "OK" if converted else "TE")  # converted: the API makes one number a vector of one
    add("str", lambda: "tensor", "TE")
    add("object", lambda: object(), "TE")
    add("raising-producer", lambda: RaisingProducer(), "BE" if core else "TE")
    wrong = [torch.float64, torch.int32, torch.bool] + ([torch.int64] if is_float else [torch.float32])
    for dtype in wrong:
        add(f"dtype-{dtype}", lambda dtype=dtype: _like(t, base.to(dtype)), "ANY" if converted else "TE")
    # another float dtype is fine unless another tensor of the call must share this one's dtype
    peers = [k for k, a in call.spec.items() if k != name and a.kind == "tensor" and a.dtype == "group"
             and call.kwargs.get(k) is not None]
    if is_float:
        for dtype in FLOATS:
            if dtype != base.dtype:
                ok = arg.dtype == "own" or (arg.dtype == "group" and not peers)
                # a converted table rounded to bfloat16 may get equal neighbours, which it must refuse
                expect = "ANY" if converted else ("OK" if ok else "TE")
                add(f"dtype-{dtype}", lambda dtype=dtype: base.to(dtype), expect)
        add("complex-conj", lambda: base.to(torch.complex64).conj(), "REJ")
    # shapes: a lone tensor may change shape as far as the kernel allows, one with peers may not
    def present(kind: str) -> list[str]:
        return [k for k, a in call.spec.items() if k != name and a.kind == "tensor" and a.shape == kind
                and call.kwargs.get(k) is not None]

    any_shape = arg.shape == "any"
    lone_batch = arg.shape == "group" and not present("group")  # others only fix the batch
    source = arg.shape == "source"  # the vector that defines the batch
    add("extra-dim", lambda: _like(t, base.unsqueeze(-1)), "OK" if any_shape or lone_batch else "VE")
    add("longer", lambda: _like(t, torch.cat([base.reshape(-1), base.reshape(-1)[:1]])),
        "OK" if any_shape or (source and not present("sample")) else "VE")
    add("scalar", lambda: _like(t, base.reshape(-1)[0].clone()), "OK" if any_shape or converted else "VE")
    add("empty", lambda: _like(t, base.reshape(-1)[:0]), "VE")
    # memory layout (the API copies converted tensors, so their layout does not matter)
    add("strided", lambda: _strided(base), "OK" if converted or base.numel() == 1 else "VE")
    if base.dim() >= 2 and base.shape[0] > 1 and base.shape[1] > 1:
        add("transposed", lambda: base.transpose(0, 1).contiguous().transpose(0, 1), "VE")
    if _numpy_ok(t):
        add("read-only-numpy", lambda: _read_only(t), "VE" if out else "OK")
        add("numpy", lambda: base.numpy(), "OK")
    if isinstance(t, np.ndarray):
        add("torch", lambda: base, "OK")
    # torch-only tensors
    add("sparse", lambda: base.to_sparse(), "BE" if core else "VE")
    add("meta", lambda: torch.empty(base.shape, dtype=base.dtype, device="meta"), "BE" if core else "VE")
    if is_float:
        add("requires-grad", lambda: base.clone().requires_grad_(True), "BE" if core else "OK")
        # through the API a negated input is read as such: sigma and table values then turn negative
        negative_invalid = arg.special == "sigma" or arg.shape in ("table", "source")
        add("neg-view", lambda: torch._neg_view(base.clone()),
            "BE" if core else ("VE" if out or negative_invalid else "OK"))
    # values
    if arg.special == "sigma" or (converted and arg.shape == "source"):
        add("sigma-nan", lambda: _with_value(t, math.nan, rng), "VE")
        add("sigma-zero", lambda: _with_value(t, 0.0, rng), "VE")
        add("sigma-negative", lambda: _with_value(t, -1.0, rng), "VE")
        add("sigma-small", lambda: _like(t, base * 1e-3), "OK")
        add("sigma-large", lambda: _like(t, base * 1e2), "OK")
    elif arg.special in ("table", "converted") and arg.shape == "table":
        add("table-nan", lambda: _with_value(t, math.nan, rng), "VE")
        add("table-unsorted", lambda: _like(t, base.flip(0)), "VE")
        add("table-negative", lambda: _like(t, base - 1000.0), "VE")
        add("table-other", lambda: _like(t, base * 0.5), "OK")
    elif is_float and not out and arg.special != "converted":
        # 6e4 is finite in every dtype but overflows float16 outputs downstream (nonfinite must count them)
        for label, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("large", 6e4)):
            add(f"value-{label}", lambda value=value: _with_value(t, value, rng), "OK")
    # aliasing: an output that is one of the inputs
    if out:
        for other, other_arg in call.spec.items():
            v = call.kwargs.get(other)
            if other_arg.kind == "tensor" and other_arg.role == "in" and v is not None and other != name:
                ov = _torch(v)
                if ov.shape == base.shape and ov.dtype == base.dtype:
                    add(f"alias-{other}", lambda v=v: v, "VE")
    return muts


def list_mutations(call: Call, name: str, arg: Arg, seq: list, rng: np.random.Generator) -> list[Mutation]:
    none_expect = "TE" if arg.none_ok is None else ("OK" if arg.none_ok(call.kwargs) else "VE")
    muts = [
        Mutation(name, "none", lambda: None, none_expect),
        Mutation(name, "tensor", lambda: seq[0], "TE"),
        Mutation(name, "dict", lambda: {}, "TE"),
        Mutation(name, "empty", lambda: [], "VE"),
        Mutation(name, "shorter", lambda: list(seq[:-1]), "VE"),
        Mutation(name, "longer", lambda: [*seq, _torch(seq[-1])], "VE"),
        Mutation(name, "tuple", lambda: tuple(seq), "OK"),
    ]
    if arg.role == "inout" and len(seq) > 1:
        muts.append(Mutation(name, "same-tensor-twice", lambda: [seq[0], seq[0], *seq[2:]], "VE"))
    i = int(rng.integers(len(seq)))
    # the item's partners in the other lists fix its shape: stand in for them with one peer
    item_call = Call(call.op, {"partner": seq[i]}, {"partner": TENSOR()}, call.dtype)
    for m in tensor_mutations(item_call, f"{name}[{i}]", TENSOR(arg.role, arg.dtype), seq[i], rng):
        if m.label.startswith("alias-"):
            continue
        muts.append(Mutation(name, f"item{i}-{m.label}", lambda m=m, i=i: [*seq[:i], m.make(), *seq[i + 1:]],
                             m.expect))
    partner = {"ema": "params", "params": "grads"}.get(name) if arg.role == "inout" else None
    if partner:
        muts.append(Mutation(name, "item-is-partner", lambda: [call.kwargs[partner][0], *seq[1:]], "VE"))
    return muts


def scalar_mutations(call: Call, name: str, arg: Arg, value: Any, rng: np.random.Generator) -> list[Mutation]:
    kw = call.kwargs

    def numeric(label: str, v: Any) -> Mutation:
        return Mutation(name, label, lambda: v, "OK" if arg.valid(float(v), kw) else "VE")

    none_expect = "TE" if arg.none_ok is None else ("OK" if arg.none_ok(kw) else "VE")
    if arg.kind == "real":
        base = 0.5 if value is None else float(value)
        lo, hi = arg.plausible
        muts = [Mutation(name, label, lambda v=v: v, e) for label, v, e in (
            ("str", "1.5", "TE"), ("bool", True, "TE"), ("complex", 1j, "TE"), ("np-complex", np.complex128(1.0), "TE"),
            ("list", [1.0], "TE"), ("array", np.ones(2), "TE"), ("tensor", torch.ones(3), "TE"),
            ("nan", math.nan, "VE"), ("inf", math.inf, "VE"), ("-inf", -math.inf, "VE"), ("1e39", 1e39, "VE"),
            ("-1e39", -1e39, "VE"), ("huge-int", 10**400, "VE"))]
        muts.append(Mutation(name, "none", lambda: None, none_expect))
        muts += [numeric(label, v) for label, v in (
            ("tiny", 1e-50), ("zero", 0.0), ("negative", -0.75), ("one", 1), ("np.float32", np.float32(base)),
            ("np.float64", np.float64(base)), ("np.int64", np.int64(1)), ("other", float(rng.uniform(lo, hi))))]
        return muts
    if arg.kind == "u64":
        return [Mutation(name, label, lambda v=v: v, e) for label, v, e in (
            ("negative", -1, "VE"), ("2**64", 2**64, "VE"), ("1e30", 10**30, "VE"), ("float", 1.0, "TE"),
            ("str", "1", "TE"), ("none", None, "TE"), ("bool", True, "TE"), ("np.bool", np.True_, "TE"),
            ("max", 2**64 - 1, "OK"), ("np.uint64", np.uint64(7), "OK"), ("np.int8", np.int8(3), "OK"),
            ("zero", 0, "OK"), ("other", int(rng.integers(0, 2**62)), "OK"))]
    if arg.kind == "int":
        lo, hi = arg.plausible
        other = int(rng.integers(lo, hi + 1))
        return [Mutation(name, label, lambda v=v: v, e) for label, v, e in (
            ("float", 1.5, "TE"), ("float-int", float(other), "TE"), ("str", str(other), "TE"), ("none", None, "TE"),
            ("bool", True, "TE"), ("below", arg.lo - 1, "VE"), ("negative", -5, "VE"), ("huge", 10**30, "VE"),
            ("np.int64", np.int64(other), "OK"), ("other", other, "OK"))]
    if arg.kind == "choice":
        muts = [Mutation(name, label, lambda v=v: v, e) for label, v, e in (
            ("none", None, "TE"), ("int", 1, "TE"), ("bytes", value.encode(), "TE"), ("nul", value + "\0", "VE"),
            ("surrogate", "\ud800", "VE"), ("empty", "", "VE"), ("space", " " + value, "VE"))]
        if value.upper() not in arg.choices:
            muts.append(Mutation(name, "upper", lambda: value.upper(), "VE"))
        for c in arg.choices:
            if c != value:
                muts.append(Mutation(name, f"other-{c}", lambda c=c: c, "OK" if arg.valid(c, kw) else "VE"))
        return muts
    if arg.kind == "flag":
        flip = not value
        e = "OK" if arg.valid(flip, kw) else "VE"
        return [Mutation(name, label, lambda v=v: v, ex) for label, v, ex in (
            ("str", "False", "TE"), ("none", None, "TE"), ("two", 2, "VE"), ("minus-one", -1, "VE"),
            ("float", 1.0, "TE"), ("list", [], "TE"), ("tensor", torch.tensor(True), "TE"),
            ("np.bool", np.bool_(flip), e), ("int", int(flip), e), ("flip", flip, e))]
    if arg.kind == "device":
        return [Mutation(name, label, lambda v=v: v, e) for label, v, e in (
            ("none", None, "OK"), ("cpu-device", torch.device("cpu"), "OK"), ("cuda", "cuda", "VE"),
            ("cuda-index", 0, "VE"), ("meta", "meta", "VE"), ("bad", "nowhere", "VE"), ("float", 1.5, "TE"),
            ("list", ["cpu"], "TE"), ("bool", True, "TE"))]
    raise KeyError(arg.kind)


def mutations(call: Call, rng: np.random.Generator) -> list[Mutation]:
    names = list(call.spec)
    name = names[int(rng.integers(len(names)))]
    arg, value = call.spec[name], call.kwargs[name]
    if arg.kind == "tensor":
        if value is None:  # an optional tensor left out: pass one of the right kind instead
            ok = name != "index_out" or call.kwargs.get("table") is not None
            return [Mutation(name, "present", lambda: present_tensor(call, arg), "OK" if ok else "VE")]
        return tensor_mutations(call, name, arg, value, rng)
    if arg.kind == "list":
        if value is None:  # exp_avgs left out (beta1 = 0): a zero first moment is valid too
            return [Mutation(name, "present", lambda: [_torch(v) * 0 for v in call.kwargs["exp_avg_sqs"]], "OK")]
        return list_mutations(call, name, arg, value, rng)
    return scalar_mutations(call, name, arg, value, rng)


def present_tensor(call: Call, arg: Arg) -> torch.Tensor:
    """A valid tensor for an optional argument the call left out (sigma, d_uncond, dr, eps_out, table, ...)."""
    if arg.shape == "table":
        return torch.linspace(0.01, 100.0, 16)
    tensors = [(_torch(v), call.spec[k]) for k, v in call.kwargs.items() if call.spec[k].kind == "tensor"
               and v is not None]
    like = next((v for v, a in tensors if a.shape == "group"), None)
    if arg.shape == "sample":
        vectors = (v.shape[0] for v, a in tensors if a.shape in ("sample", "source"))
        batch = like.shape[0] if like is not None else next(vectors)
        if arg.dtype == "i64":
            return torch.full((batch,), -7, dtype=torch.int64)
        return torch.full((batch,), 0.5)
    return torch.full_like(like, 7.25 if arg.role == "out" else 0.25)


def make_call(seed: int, index: int) -> tuple[Call, Mutation]:
    rng = np.random.default_rng([seed, index])
    ops = list(BUILDERS)
    op = ops[int(rng.integers(len(ops)))]
    g = Gen(rng, op.startswith("api."))
    kwargs, spec = BUILDERS[op](g)
    call = Call(op, kwargs, spec, g.dtype)
    pool = mutations(call, rng)
    return call, pool[int(rng.integers(len(pool)))]


# --------------------------------------------------------------------------- references


def T(x: Any) -> torch.Tensor:
    """The values of x as a (resolved, detached) torch tensor."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x))
    if isinstance(x, torch.Tensor):
        return x.detach().resolve_neg().resolve_conj().clone()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))  # a list the API converted


def elem_tol(x: Any) -> tuple[float, float]:
    tol = TOLERANCES[T(x).dtype] if T(x).dtype in TOLERANCES else TOLERANCES[torch.float32]
    return tol["rtol"], tol["atol"]


def close(what: str, got: Any, want: Any, rtol: float, atol: float, scale: float | None = None) -> None:
    """Same NaN and Inf places; finite values within atol * scale + rtol |want|, scale = max(1, max |want|)
    unless given (outputs formed as differences of larger terms are judged against those)."""
    g, w = T(got).to(torch.float64).reshape(-1), T(want).to(torch.float64).reshape(-1)
    if g.shape != w.shape:
        raise Mismatch(f"{what}: {g.numel()} values, want {w.numel()}")
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        raise Mismatch(f"{what}: NaN at other places: got {g[:12].tolist()}, want {w[:12].tolist()}")
    gi, wi = torch.isinf(g), torch.isinf(w)
    if not torch.equal(gi, wi) or not torch.equal(g[gi], w[wi]):
        raise Mismatch(f"{what}: Inf at other places: got {g[:12].tolist()}, want {w[:12].tolist()}")
    fin = torch.isfinite(w)
    if fin.any():
        scale = max(1.0, float(w[fin].abs().max()), scale or 0.0)
        err = (g[fin] - w[fin]).abs()
        if bool((err > atol * scale + rtol * w[fin].abs()).any()):
            raise Mismatch(f"{what}: error {float(err.max()):.3g}: got {g[:8].tolist()}, want {w[:8].tolist()}")


def close_elem(what: str, got: Any, want: Any, scale: float | None = None) -> None:
    close(what, got, want, *elem_tol(got), scale=scale)


def magnitude(*values: torch.Tensor) -> float:
    """The largest finite |value| among the tensors (0 if none)."""
    finite = [v.double().abs()[torch.isfinite(v)] for v in values]
    return max((float(f.max()) for f in finite if f.numel()), default=0.0)


def close_sample(what: str, got: Any, want: Any) -> None:
    close(what, got, want, 1e-4, 1e-4)


def equal_counts(what: str, got: Any, want: Any) -> None:
    if T(got).tolist() != T(want).tolist():
        raise Mismatch(f"{what}: {T(got).tolist()}, want {T(want).tolist()}")


def opt(x: Any) -> torch.Tensor | None:
    return None if x is None else T(x)


def want_fill(out: Any, seed: int, offset: int, normal: bool) -> torch.Tensor:
    n = T(out).numel()
    if normal:
        return torch.from_numpy(ref.normal(int(seed), int(offset), n))
    dtype = T(out).dtype
    return torch.from_numpy(ref.uniform(int(seed), int(offset), n)).clamp(max=tref.below_one(dtype))


def check_fill(out: Any, seed: int, offset: int, normal: bool) -> None:
    rtol, atol = elem_tol(out)
    want = want_fill(out, seed, offset, normal)
    close("out", out, want, rtol, max(atol, 1e-5) if normal else atol)
    if not normal and not bool(((T(out).float() > 0) & (T(out).float() < 1)).all()):
        raise Mismatch("uniforms outside (0, 1)")


def table_values(kw: dict) -> np.ndarray | None:
    """The sigma table as float64, a single number being a table of one (as the API reads it)."""
    return None if kw.get("table") is None else np.atleast_1d(T(kw["table"]).double().numpy())


def want_sigma(batch: int, kw: dict) -> tuple[np.ndarray, np.ndarray | None]:
    table = table_values(kw)
    with np.errstate(over="ignore"):
        sigma, index = ref.sample_sigma(batch, int(kw["seed"]), int(kw["offset"]), float(kw["p_mean"]),
                                        float(kw["p_std"]), float(kw["sigma_min"]), float(kw["sigma_max"]), table)
    if kw.get("snap"):
        sigma = table[index]
    return sigma, index


def check_sigma(sigma: Any, index: Any, kw: dict) -> None:
    s, i = want_sigma(T(sigma).numel(), kw)
    close_sample("sigma", sigma, torch.from_numpy(s))
    if index is not None and i is not None and T(index).tolist() != i.tolist():
        got, table, raw = T(index).numpy(), table_values(kw), want_sigma(len(s), {**kw, "snap": 0})[0]
        if not np.allclose(np.abs(table[got] - raw), np.abs(table[i] - raw), rtol=1e-5):  # float32 near-ties
            raise Mismatch(f"index: {got.tolist()}, want {i.tolist()}")


def want_table(kw: dict) -> np.ndarray:
    steps = int(kw["steps"])
    if kw["kind"] == "iddpm_linear":
        start = 1e-4 if kw.get("beta_start") is None else float(kw["beta_start"])
        end = 0.02 if kw.get("beta_end") is None else float(kw["beta_end"])
        return ref.iddpm_linear_table(steps, start, end, float(kw.get("clip", 1e-3)))
    start = 0.00085 if kw.get("beta_start") is None else float(kw["beta_start"])
    end = 0.012 if kw.get("beta_end") is None else float(kw["beta_end"])
    return ref.scaled_linear_table(steps, start, end)


def want_precond(sigma: Any, kind: str, sigma_data: float) -> dict[str, torch.Tensor]:
    s = T(sigma).double()
    sd = float(np.float32(sigma_data)) if kind == "edm" else 1.0
    s2, d2 = s * s, sd * sd
    root = torch.sqrt(s2 + d2)
    if kind == "edm":
        c_skip, c_out, c_noise = d2 / (s2 + d2), s * sd / root, 0.25 * torch.log(s)
    else:
        c_skip = 1.0 / (s2 + 1.0) if kind == "v" else torch.ones_like(s)
        c_out, c_noise = (-s / root if kind == "v" else -s), s
    return {"c_skip": c_skip, "c_out": c_out, "c_in": 1.0 / root, "c_noise": c_noise,
            "weight": (s2 + d2) / (s2 * d2)}


def check_precond(outs: dict[str, Any], sigma: Any, kind: str, sigma_data: float) -> None:
    for k, v in want_precond(sigma, kind, sigma_data).items():
        close(k, outs[k], v, 2e-5, 1e-6)


def want_noise(x0: Any, sigma: Any, seed: int, offset: int, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = T(x0).double()
    eps = torch.from_numpy(ref.normal(int(seed), int(offset), x.numel())).reshape(x.shape)
    s = T(sigma).double().reshape((-1,) + (1,) * (x.dim() - 1))
    return ((1 - s) * x + s * eps if flow else x + s * eps), eps


def check_noise(xt: Any, eps: Any, x0: Any, sigma: Any, seed: int, offset: int, flow: bool) -> None:
    want_xt, want_eps = want_noise(x0, sigma, seed, offset, flow)
    rtol, atol = elem_tol(xt)
    close("xt", xt, want_xt, rtol, max(atol, 3e-5))
    if eps is not None:
        close("eps", eps, want_eps, rtol, max(atol, 1e-5))


def check_ta(loss: Any, grad: Any, bad: Any, kw: dict) -> None:
    want = tref.ta_loss(T(kw["d_ta"]), T(kw["x0"]), opt(kw["sigma"]), kw["weighting"], float(kw["sigma_data"]),
                        kw["reduction"], grad is not None)
    close_sample("loss", loss, want.loss)
    if grad is not None:
        close_elem("grad", grad, want.grad)
    if bad is not None:
        equal_counts("nonfinite", bad, want.nonfinite)


def check_gen(res: dict[str, Any], kw: dict) -> None:
    want = tref.generator_grad(T(kw["x0"]), T(kw["d_ta"]), T(kw["d_cond"]), opt(kw["d_uncond"]), float(kw["omega"]),
                               opt(kw["dr"]), float(kw["alpha"]), kw["weighting"], float(kw["min_norm"]))
    close_elem("grad", res["grad"], want.grad)
    for k in ("weight", "ref_dist", "gap", "surrogate"):
        close_sample(k, res[k], getattr(want, k))
    equal_counts("nonfinite", res["nonfinite"], want.nonfinite)


def check_huber(res: dict[str, Any], kw: dict) -> None:
    want = tref.huber_terms(T(kw["x0"]), T(kw["d_p"]), T(kw["d_q"]), T(kw["sigma"]), float(kw["c"]),
                            kw["weighting"])
    # b = d''r cancels against d' in float32 when c << |y|: judge the three against their common size,
    # taken before rounding to the output dtype (where a and d' may overflow)
    wide = tref.huber_terms(T(kw["x0"]).double(), T(kw["d_p"]).double(), T(kw["d_q"]).double(), T(kw["sigma"]),
                            float(kw["c"]), kw["weighting"])
    scale = magnitude(wide.a, wide.b, wide.dprime)
    for k in ("a", "b", "dprime"):
        close_elem(k, res[k], getattr(want, k), scale)
    for k in ("ysq", "yr", "h", "value"):
        close_sample(k, res[k], getattr(want, k))
    equal_counts("nonfinite", res["nonfinite"], want.nonfinite)


def check_ema(before: dict, after: dict) -> None:
    ema = [T(e) for e in before["ema"]]
    tref.ema_update(ema, [T(p) for p in before["params"]], float(before["decay"]))
    for i, (got, want) in enumerate(zip(after["ema"], ema, strict=True)):
        close_elem(f"ema[{i}]", got, want)


def check_adam(before: dict, after: dict) -> None:
    params = [T(p) for p in before["params"]]
    m = None if before["exp_avgs"] is None else [T(x) for x in before["exp_avgs"]]
    v = [T(x) for x in before["exp_avg_sqs"]]
    tref.adam_step(params, [T(g) for g in before["grads"]], m, v, float(before["lr"]), float(before["beta1"]),
                   float(before["beta2"]), float(before["eps"]), float(before["weight_decay"]), int(before["step"]),
                   bool(before["decoupled"]))
    for i, (got, want) in enumerate(zip(after["params"], params, strict=True)):
        close_elem(f"params[{i}]", got, want)
    for name, wants in (("exp_avgs", m), ("exp_avg_sqs", v)):
        for i, (got, want) in enumerate(zip(after[name] or [], wants or [], strict=True)):
            close_elem(f"{name}[{i}]", got, want)


def check(call: Call, before: dict, result: Any) -> None:
    """Raises Mismatch unless the outputs of a successful call match the references."""
    kw, op = call.kwargs, call.op.split(".", 1)[1]
    api = call.op.startswith("api.")
    if op in ("fill_uniform", "fill_normal"):
        if api and result is not kw["out"]:
            raise Mismatch("fill did not return out")
        check_fill(kw["out"], kw["seed"], kw["offset"], op == "fill_normal")
    elif op == "sample_sigma":
        if api:
            sigma, index = result
            if (kw["device"] is None) != isinstance(sigma, np.ndarray):
                raise Mismatch(f"sample_sigma returned {type(sigma).__name__} for device {kw['device']!r}")
            check_sigma(sigma, index, kw)
        else:
            check_sigma(kw["sigma_out"], kw["index_out"], kw)
    elif op == "sigma_table":
        close("table", torch.from_numpy(result), torch.from_numpy(want_table(kw)), 1e-9, 0.0)
    elif op == "precond":
        outs = result if api else kw
        check_precond(outs, kw["sigma"], kw["kind"], kw["sigma_data"])
    elif op == "add_noise":
        if api:
            xt, eps = result if kw["return_eps"] else (result, None)
            if kw["out"] is not None and xt is not kw["out"]:
                raise Mismatch("add_noise did not return out")
        else:
            xt, eps = kw["xt_out"], kw["eps_out"]
        check_noise(xt, eps, kw["x0"], kw["sigma"], kw["seed"], kw["offset"], bool(kw["flow"]))
    elif op == "cfg_combine":
        got = result if api else kw["out"]
        close_elem("out", got, tref.cfg_combine(T(kw["uncond"]), T(kw["cond"]), float(kw["omega"])))
    elif op == "ta_loss":
        if api:
            check_ta(result.loss, result.grad if kw["need_grad"] else None, result.nonfinite, kw)
            if not kw["need_grad"] and result.grad is not None:
                raise Mismatch("ta_loss computed a gradient with need_grad=False")
        else:
            check_ta(kw["loss_out"], kw["grad_out"], kw["nonfinite_out"], kw)
    elif op == "generator_grad":
        names = ("grad", "weight", "ref_dist", "gap", "surrogate", "nonfinite")
        if api:
            res = result._asdict()
        else:
            res = dict(zip(names, (kw[f"{k}_out"] for k in names), strict=True))
        check_gen(res, kw)
    elif op == "huber_terms":
        names = ("a", "b", "dprime", "ysq", "yr", "h", "value", "nonfinite")
        res = result._asdict() if api else {k: kw[f"{k}_out"] for k in names}
        check_huber(res, kw)
    elif op == "ema_update":
        check_ema(before, kw)
    elif op == "adam_step":
        check_adam(before, kw)
    elif op == "stream_copy":
        close("a", kw["a"], T(kw["b"]), 0.0, 0.0)
    elif op == "stream_triad":
        close("a", kw["a"], T(kw["b"]) + np.float32(kw["scalar"]) * T(kw["c"]), 1e-6, 1e-6)
    else:
        raise KeyError(op)


# --------------------------------------------------------------------------- running one call


def _snapshot(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone() if v.layout == torch.strided and v.device.type != "meta" else v
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, (list, tuple)):
        return type(v)(_snapshot(x) for x in v)
    return v


def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        extra = " neg" if v.layout == torch.strided and v.is_neg() else ""
        return f"torch{tuple(v.shape)}:{str(v.dtype)[6:]}:{v.device.type}:{str(v.layout)[6:]}{extra}"
    if isinstance(v, np.ndarray):
        return f"numpy{v.shape}:{v.dtype}{'' if v.flags.writeable else ':ro'}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "[" + ", ".join(describe(x) for x in v) + "]"
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."


def run_one(seed: int, index: int) -> dict[str, Any]:
    """Builds, mutates and runs call `index`; the verdict as a JSON-able dict."""
    try:
        call, mut = make_call(seed, index)
        call.kwargs[mut.arg] = mut.make()
    except Exception as error:  # a bug of this file, not of the code under test; reported all the same
        return {"index": index, "op": "?", "arg": "?", "mutation": "?", "verdict": "harness-error",
                "why": f"{type(error).__name__}: {error}"}
    args = ", ".join(f"{k}={describe(v)}" for k, v in call.kwargs.items())
    record = {"index": index, "op": call.op, "arg": mut.arg, "mutation": mut.label, "expect": mut.expect,
              "args": args}
    before = {k: _snapshot(v) for k, v in call.kwargs.items()}
    fn = getattr(_core if call.op.startswith("core.") else K, call.op.split(".", 1)[1])
    try:
        result = fn(**call.kwargs)
    except Exception as error:  # a rejection: the right class, naming the argument
        message = f"{type(error).__name__}: {error}"
        record["error"] = message[:400]
        names = (mut.arg,) + (OUT_ALIASES.get(call.op, ()) if mut.arg == "out" else ())
        if mut.expect == "OK":
            record["verdict"] = "unexpected-rejection"
        elif not isinstance(error, EXPECT["REJ"]) or not isinstance(error, EXPECT.get(mut.expect, EXPECT["REJ"])):
            record["verdict"] = "bad-message"
            record["why"] = f"{type(error).__name__}, expected {mut.expect}"
        elif not _names_argument(str(error), names):
            record["verdict"] = "bad-message"
            record["why"] = f"does not name {mut.arg}"
        else:
            record["verdict"] = "rejected"
        return record
    if mut.expect not in ("OK", "ANY"):
        record["verdict"] = "wrong-result"
        record["why"] = f"accepted (expected {mut.expect})"
        return record
    try:
        check(call, before, result)
    except Exception as error:  # a Mismatch, or a result the checker cannot read: wrong either way
        record["verdict"] = "wrong-result"
        record["why"] = f"{type(error).__name__}: {error}"[:400]
        return record
    record["verdict"] = "ok"
    return record


def worker(seed: int, start: int, count: int) -> None:
    """Runs calls start..start+count-1, one JSON line before and after each (the parent reads them)."""
    torch.set_num_threads(1)
    for index in range(start, start + count):
        print(json.dumps({"begin": index}), flush=True)
        print(json.dumps(run_one(seed, index)), flush=True)


# --------------------------------------------------------------------------- the driver


def fuzz(seed: int, calls: int, workers: int, timeout: float = 300.0) -> dict[str, list[dict[str, Any]]]:
    """All calls over `workers` subprocesses; a crashed worker is restarted after the crashing call."""
    outcome: dict[str, list[dict[str, Any]]] = {"ok": [], "rejected": [], "crash": [], "wrong-result": [],
                                                "bad-message": [], "unexpected-rejection": [], "harness-error": []}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    bounds = np.linspace(0, calls, workers + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        start = int(lo)
        while start < hi:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(seed), str(start), str(int(hi) - start)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            last_begin, done = None, start
            for line in proc.stdout.splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "begin" in item:
                    last_begin = item["begin"]
                else:
                    outcome[item["verdict"]].append(item)
                    done, last_begin = item["index"] + 1, None
            if proc.returncode == 0 and done >= hi:
                break
            crashed = last_begin if last_begin is not None else done
            call, mut = make_call(seed, crashed)
            outcome["crash"].append({"index": crashed, "op": call.op, "arg": mut.arg, "mutation": mut.label,
                                     "returncode": proc.returncode, "stderr": proc.stderr[-1500:]})
            start = crashed + 1
    return outcome


def summary(outcome: dict[str, list[dict[str, Any]]], seed: int) -> str:
    total = sum(len(v) for v in outcome.values())
    lines = [f"fuzz seed {seed}: {total} calls, {len(outcome['ok'])} succeeded and matched the reference, "
             f"{len(outcome['rejected'])} rejected naming the argument; {len(outcome['crash'])} crashes, "
             f"{len(outcome['wrong-result'])} wrong results, {len(outcome['bad-message'])} bad messages, "
             f"{len(outcome['unexpected-rejection'])} valid calls rejected, "
             f"{len(outcome['harness-error'])} harness errors"]
    for kind in ("crash", "wrong-result", "bad-message", "unexpected-rejection", "harness-error"):
        for item in outcome[kind][:20]:
            lines.append(f"  {kind}: {item['op']} {item['arg']} <- {item['mutation']} "
                         f"[{item.get('why', item.get('error', item.get('returncode')))}]")
            lines.append(f"    reproduce: python tests/test_fuzz_binding.py --replay {seed} {item['index']}")
            if "args" in item:
                lines.append(f"    args: {item['args']}")
            if kind == "crash":
                lines.append("    " + item["stderr"].replace("\n", "\n    "))
    return "\n".join(lines)


def test_fuzz_binding_and_public_api():
    """10^4 mutated calls: no crash, no silent wrong result, every rejection names its argument."""
    outcome = fuzz(SEED, CALLS, WORKERS)
    report = summary(outcome, SEED)
    print(report)
    assert sum(len(v) for v in outcome.values()) == CALLS, report
    for kind in ("crash", "wrong-result", "bad-message", "unexpected-rejection", "harness-error"):
        assert not outcome[kind], report
    # the mix is meaningful: many rejections, many successes checked against the reference
    assert len(outcome["rejected"]) > CALLS // 3 and len(outcome["ok"]) > CALLS // 10, report


def test_reference_check_catches_wrong_outputs():
    """The check that judges successful calls fails on a negated result (the neg-view bug's symptom),
    on one wrong element, and on a wrong non-finite count."""
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    kw = {"uncond": u, "cond": c, "out": torch.empty(2, 5), "omega": 2.0}
    call = Call("core.cfg_combine", kw, {}, torch.float32)
    _core.cfg_combine(**kw)
    check(call, {}, None)
    for wrong in (-kw["out"], kw["out"] + torch.eye(2, 5)):
        with pytest.raises(Mismatch):
            check(Call("core.cfg_combine", {**kw, "out": wrong}, {}, torch.float32), {}, None)
    x = torch.randn(2, 5, generator=g)
    res = K.generator_grad(x, x + 1, x)
    call = Call("api.generator_grad", {"x0": x, "d_ta": x + 1, "d_cond": x, "d_uncond": None, "omega": 1.0,
                                       "dr": None, "alpha": 0.0, "weighting": "normalized", "min_norm": 1e-5},
                {}, torch.float32)
    check(call, {}, res)
    with pytest.raises(Mismatch, match="nonfinite"):
        check(call, {}, res._replace(nonfinite=res.nonfinite + 1))


def test_fuzz_catches_crashes_in_a_worker(monkeypatch):
    """The driver survives a worker that dies and names the call that killed it."""
    monkeypatch.setenv("DIPP_FUZZ_ABORT_AT", "3")
    outcome = fuzz(SEED, 6, 1)
    assert [c["index"] for c in outcome["crash"]] == [3]
    assert sum(len(v) for v in outcome.values()) == 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, type=int, metavar=("SEED", "START", "COUNT"))
    parser.add_argument("--replay", nargs=2, type=int, metavar=("SEED", "INDEX"))
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args()
    if args.worker:
        abort_at = os.environ.get("DIPP_FUZZ_ABORT_AT")
        if abort_at is not None:  # only for test_fuzz_catches_crashes_in_a_worker
            _install_abort(int(abort_at))
        worker(*args.worker)
    elif args.replay:
        seed, index = args.replay
        call, mut = make_call(seed, index)
        print(f"{call.op}: mutate {mut.arg} <- {mut.label} (expect {mut.expect})")
        try:
            print(json.dumps(run_one(seed, index), indent=1))
        except BaseException:
            traceback.print_exc()
    else:
        print(summary(fuzz(args.seed, args.calls, args.workers), args.seed))


def _install_abort(index: int) -> None:
    global run_one
    inner = run_one

    def aborting(seed: int, i: int) -> dict[str, Any]:
        if i == index:
            os.abort()
        return inner(seed, i)

    run_one = aborting


if __name__ == "__main__":
    main()
