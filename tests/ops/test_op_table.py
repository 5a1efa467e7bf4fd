"""The op table and the backends.

- every public kernel has one entry in kernels.ops.OPS, whose parameters are its C entry point's;
- backends() says, per op, which backend can run it here and why not; use_backend() and DIPP_BACKEND
  force one, 'auto' and leaving the block restore the default;
- the Python twin of the binding's checks (kernels/validate.py), which the reference backend runs,
  refuses what the binding refuses with the same exception and message: on every bad-input case of
  the per-op files and on fuzzed calls of the binding, and public calls fuzzed the same way fail (or
  succeed, with checked outputs) alike on every backend;
- the per-op files together cover every entry point.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import test_fuzz_binding as fuzz
import torch

from core_args import FUNCTIONS, valid_kwargs
from diffinstruct import _core
from diffinstruct import kernels as K
from diffinstruct.kernels import ops, registry
from diffinstruct.kernels.ops import OPS
from diffinstruct.kernels.spec import TensorList
from diffinstruct.kernels.validate import validate

PER_OP = ["test_fill", "test_sample_sigma", "test_sigma_table", "test_precond", "test_add_noise", "test_cfg_combine",
          "test_ta_loss", "test_generator_grad", "test_huber_terms", "test_ema_update", "test_adam_step",
          "test_stream_probes", "test_dlpack"]
HOST_SIDE = ("sigma_table", "precond")


def per_op_modules() -> list[Any]:
    return [importlib.import_module(name) for name in PER_OP]


def all_cases() -> list[Any]:
    return [p for m in per_op_modules() for p in m.CASES]


# ---------------------------------------------------------------------------------------------- the table


def test_case_count():
    ids = [p.id for p in all_cases()]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(ids) >= 70
    covered = {p.values[0].fn for p in all_cases()}
    assert covered == set(FUNCTIONS), set(FUNCTIONS) - covered


def test_float_scalars_cover_every_entry_point():
    with_floats = {fn for m in per_op_modules() for fn, _, _ in getattr(m, "FLOAT_SCALARS", [])}
    assert with_floats == set(FUNCTIONS) - {"fill_uniform", "fill_normal", "add_noise", "stream_copy"}


def test_every_public_kernel_has_one_entry():
    public = {name for name in K.__all__ if name.islower()} - {"backends", "use_backend", "cuda_backend_status"}
    assert set(OPS) == public
    assert all(callable(getattr(_core, name)) for name in OPS)


def test_params_are_the_c_entry_points_arguments():
    """The dispatch passes op.params positionally: they must be the entry's arguments, in order."""
    for name, op in OPS.items():
        signature = re.match(rf"{name}\((.*?)\)", getattr(_core, name).__doc__ or "")
        assert signature, name
        args = [a.strip().split("=")[0] for a in signature.group(1).split(",")]
        args = [a for a in args if a not in ("*", "stream")]
        assert list(op.params) == args[:len(op.params)], name
        checked = {s.name for s in op.scalars} | {t.name for t in op.tensors}
        assert checked <= set(op.params), name
        assert (op.reference is None) == (name in HOST_SIDE), name


# ---------------------------------------------------------------------------------------------- the backends


def test_backends_say_what_runs_where_and_why_not():
    table = K.backends()
    assert set(table) == set(OPS)
    for name, row in table.items():
        assert set(row) == {"cpu", "cuda", "reference"}, name
        assert row["cpu"] is None, name  # the extension is built here
        assert all(reason is None or (isinstance(reason, str) and reason) for reason in row.values()), name
        if name in HOST_SIDE:
            assert "host-side" in row["reference"] and "host-side" in row["cuda"], row
        else:
            assert row["reference"] is None, name
    if not torch.cuda.is_available():
        assert "CUDA" in table["ta_loss"]["cuda"]


@pytest.fixture
def reference_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ops that ran on the reference backend."""
    ran: list[str] = []
    inner = ops._run_reference

    def counting(op: Any, args: dict[str, Any]) -> None:
        ran.append(op.name)
        inner(op, args)

    monkeypatch.setattr(ops, "_run_reference", counting)
    return ran


def test_use_backend_forces_the_reference_and_restores(reference_runs):
    x = torch.ones(2, 3)
    K.cfg_combine(x, x, 2.0)
    with K.use_backend("reference"):
        K.cfg_combine(x, x, 2.0)
        with K.use_backend("auto"):
            K.ta_loss(x, x, weighting="unit")
        K.ta_loss(x, x, weighting="unit", reduction="sum")
        pre = K.precond(torch.ones(2))  # no reference: it stays on the C extension
        K.fill_normal(np.empty(3, np.float32), 1)  # NumPy arrays too
    K.cfg_combine(x, x, 2.0)
    assert reference_runs == ["cfg_combine", "ta_loss", "fill_normal"]
    assert set(pre) == {"c_skip", "c_out", "c_in", "c_noise", "weight"}


def test_use_backend_refuses_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match=r"^use_backend\('gpu'\): unknown backend 'gpu'; choose one of cpu, cuda, "):
        with K.use_backend("gpu"):
            pass
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        with pytest.raises(K.BackendUnavailable, match=r"asks for the 'cuda' backend, which cannot run here"):
            with K.use_backend("cuda"):
                pass
    assert registry.forced() is None


def test_use_backend_is_per_thread():
    seen: list[str | None] = []
    with K.use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(registry.forced()))
        worker.start()
        worker.join()
        assert registry.forced() == "reference"
    assert seen == [None]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


SELECT = ("import torch; from diffinstruct.kernels import ops, registry; "
          "print(registry.select(ops.OPS['cfg_combine'], torch.ones(2)))")


@pytest.mark.parametrize("value,chosen", [("reference", "reference"), ("REFERENCE ", "reference"), ("auto", "cpu"),
                                          ("", "cpu"), ("cpu", "cpu")])
def test_dipp_backend_forces_a_backend(value, chosen):
    result = _run(SELECT, DIPP_BACKEND=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == chosen


def test_dipp_backend_refuses_unknown_and_unavailable_backends():
    result = _run(SELECT, DIPP_BACKEND="gpu")
    assert "ValueError: DIPP_BACKEND=gpu: unknown backend 'gpu'" in result.stderr
    if registry.unavailable_reason("cuda") is not None:
        result = _run(SELECT, DIPP_BACKEND="cuda")
        assert "BackendUnavailable: diffinstruct: DIPP_BACKEND=cuda asks for the 'cuda' backend" in result.stderr


def test_without_the_extension_the_reference_runs_what_it_has():
    code = """
import sys, warnings
sys.modules["diffinstruct._core"] = None  # as if the C extension were not built
warnings.simplefilter("ignore")
import numpy as np, torch
from diffinstruct import kernels as K
assert "not built" in K.backends()["ta_loss"]["cpu"] and K.backends()["ta_loss"]["reference"] is None
print(K.cfg_combine(np.ones(3, np.float32), np.zeros(3, np.float32), 2.0).tolist())
try:
    K.precond(torch.ones(2))
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "[-1.0, -1.0, -1.0]"
    assert lines[1].startswith("NoBackend diffinstruct: nothing here can run precond (cpu: the C extension is not "
                               "built")


# ---------------------------------------------------------------------------------------------- twin vs binding


def _plain(x: Any) -> bool:
    """A tensor the public API would hand to the dispatch as it is."""
    if isinstance(x, torch.Tensor):
        return (x.layout == torch.strided and x.device.type == "cpu" and not x.requires_grad and not x.is_neg()
                and not x.is_conj())
    return isinstance(x, np.ndarray)


def _applies(op: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the public API would pass these tensor arguments to the dispatch unchanged."""
    for spec in op.tensors:
        x = kwargs[spec.name]
        if x is None:
            if isinstance(spec, TensorList) and not spec.optional:
                return False  # refused by the public API: not a list
            continue
        if isinstance(spec, TensorList):
            if not (isinstance(x, (list, tuple)) and all(_plain(item) for item in x)):
                return False
        elif not _plain(x):
            return False
    return True


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except Exception as error:  # the outcome compared
        return type(error).__name__, str(error)
    return "ok", ""


def _twin_and_binding(fn: str, kwargs: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Both verdicts on one _core call, or None where the twin does not apply (host-side ops, the stream
    argument, values the public API refuses or converts before the dispatch)."""
    op = OPS.get(fn)
    if (op is None or op.reference is None or "stream" in kwargs or set(kwargs) != set(op.params)
            or not _applies(op, kwargs)):
        return None
    prepared = {name: ops._for_reference(kwargs[name], name, kind) if kind else kwargs[name]
                for name, kind in op.converters}
    twin = _outcome(lambda: validate(op, prepared))
    binding = _outcome(lambda: getattr(_core, fn)(**kwargs))
    return twin, binding


def test_the_twin_agrees_with_the_binding_on_every_bad_input_case():
    compared, mismatches = 0, []
    for p in all_cases():
        c = p.values[0]
        kwargs = valid_kwargs(c.fn)
        kwargs.update(c.make(kwargs))
        verdicts = _twin_and_binding(c.fn, kwargs)
        if verdicts is None:
            continue
        compared += 1
        if verdicts[0] != verdicts[1]:
            mismatches.append(f"{p.id}: twin {verdicts[0]} binding {verdicts[1]}")
    assert not mismatches, "\n".join(mismatches)
    assert compared >= 120, compared


FUZZ_CALLS = 4000


def test_the_twin_agrees_with_the_binding_on_fuzzed_calls():
    """The binding's fuzz corpus (tests/test_fuzz_binding.py): every mutated _core call the twin applies to."""
    compared, rejected, mismatches = 0, 0, []
    for index in range(FUZZ_CALLS):
        call, mutation = fuzz.make_call(fuzz.SEED, index)
        if not call.op.startswith("core."):
            continue
        kwargs = {k: v for k, v in call.kwargs.items() if k != "stream"}
        kwargs[mutation.arg] = mutation.make()
        verdicts = _twin_and_binding(call.op[5:], kwargs)
        if verdicts is None:
            continue
        compared += 1
        rejected += verdicts[1][0] != "ok"
        if verdicts[0] != verdicts[1]:
            mismatches.append(f"{index} {call.op} {mutation.arg} <- {mutation.label}: twin {verdicts[0]} "
                              f"binding {verdicts[1]}")
    assert not mismatches, "\n".join(mismatches[:30])
    assert compared > 500 and rejected > 200, (compared, rejected)


def test_fuzzed_public_calls_fail_or_succeed_alike_on_every_backend():
    """The public API's fuzz corpus, run once per backend: the same exception and message, or on both a
    success whose reference-backend outputs pass the fuzz test's own check against the references."""
    compared, succeeded, mismatches = 0, 0, []
    for index in range(3000):
        call, _ = fuzz.make_call(fuzz.SEED, index)
        if not call.op.startswith("api."):
            continue
        verdicts, last = [], None
        for backend in ("cpu", "reference"):
            call, mutation = fuzz.make_call(fuzz.SEED, index)  # fresh arguments: calls write in place
            call.kwargs[mutation.arg] = mutation.make()
            before = {k: fuzz._snapshot(v) for k, v in call.kwargs.items()}
            result: list[Any] = []
            with K.use_backend(backend):
                verdicts.append(_outcome(lambda c=call, r=result: r.append(getattr(K, c.op[4:])(**c.kwargs))))
            last = (call, before, result)
        compared += 1
        if verdicts[0] != verdicts[1]:
            mismatches.append(f"{index} {call.op} {mutation.arg} <- {mutation.label}: {verdicts}")
        elif verdicts[0][0] == "ok" and mutation.expect in ("OK", "ANY"):
            succeeded += 1
            call, before, result = last
            try:
                fuzz.check(call, before, result[0])
            except Exception as error:  # a wrong reference-backend result
                mismatches.append(f"{index} {call.op} {mutation.arg} <- {mutation.label}: reference result {error}")
    assert not mismatches, "\n".join(mismatches[:30])
    assert compared > 1000 and succeeded > 100, (compared, succeeded)
