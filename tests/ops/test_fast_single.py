"""The single-tensor ops' fast path (api.py -> the C entry with fast=): bit for bit the checked path's outputs,
of the same kinds; every call it cannot take handed back untouched, so the checked path raises its own error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffinstruct import _core
from diffinstruct import kernels as K
from diffinstruct.kernels import api, ops

FAST = ops.FAST
B, SHAPE = 3, (3, 4, 5)


def _data(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(5)]


def _sigma(seed: int = 0) -> torch.Tensor:
    return torch.rand(B, generator=torch.Generator().manual_seed(seed)) + 0.1


CALLS: dict[str, Callable[[list[Any], Any], Any]] = {
    "generator_grad": lambda t, s: K.generator_grad(t[0], t[1], t[2], d_uncond=t[3], omega=2.5, dr=t[4], alpha=0.3),
    "generator_grad_plain": lambda t, s: K.generator_grad(t[0], t[1], t[2], weighting="unit"),
    "ta_loss": lambda t, s: K.ta_loss(t[0], t[1], s),
    "ta_loss_unit": lambda t, s: K.ta_loss(t[0], t[1], weighting="unit", reduction="sum", need_grad=False),
    "huber_terms": lambda t, s: K.huber_terms(t[0], t[1], t[2], s, 0.05),
    "cfg_combine": lambda t, s: K.cfg_combine(t[0], t[1], 3.0),
    "add_noise": lambda t, s: K.add_noise(t[0], s, 11, 2, return_eps=True),
    "add_noise_flow": lambda t, s: K.add_noise(t[0], s, 5, flow=True),
    "fill_uniform": lambda t, s: K.fill_uniform(t[0], 3, 1),
    "fill_normal": lambda t, s: K.fill_normal(t[1], 4),
}


def _flat(result: Any) -> list[Any]:
    return list(result) if isinstance(result, tuple) else [result]


def _checked(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> Any:
    with monkeypatch.context() as m:
        m.setattr(api, "fast_cpu", lambda: None)
        return fn()


def _fast_only(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the checked path ran")

    with monkeypatch.context() as m:
        m.setattr(api, "run", refuse)
        return fn()


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if a is None:
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.is_cpu and b.is_cpu
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.int64 else a,
                           b.view(torch.uint8) if b.dtype != torch.int64 else b)
        assert (a._base is None) == (b._base is None)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "numpy"])
def test_fast_path_bit_for_bit(monkeypatch: pytest.MonkeyPatch, name: str, dtype: Any) -> None:
    def inputs() -> tuple[list[Any], Any]:
        t, s = _data(torch.float32 if dtype == "numpy" else dtype, 1), _sigma(1)
        return ([x.numpy() for x in t], s.numpy()) if dtype == "numpy" else (t, s)

    want = _checked(monkeypatch, lambda: CALLS[name](*inputs()))
    got = _fast_only(monkeypatch, lambda: CALLS[name](*inputs()))
    assert type(got) is type(want)
    for a, b in zip(_flat(got), _flat(want), strict=True):
        _same(a, b)


def test_fast_path_takes_parameters_and_out(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _data(torch.float32, 2)
    p = torch.nn.Parameter(t[0])
    out, want_out = torch.empty(SHAPE), torch.empty(SHAPE)
    want = _checked(monkeypatch, lambda: K.generator_grad(p, t[1], t[2], out=want_out))
    got = _fast_only(monkeypatch, lambda: K.generator_grad(p, t[1], t[2], out=out))
    assert got.grad is out and torch.equal(out, want_out)
    for a, b in zip(got, want, strict=True):
        _same(a, b)


def _hand_back_cases() -> list[tuple[str, Callable[[], Any]]]:
    t, s = _data(torch.float32, 3), _sigma(3)
    base = torch.zeros(2 * 60)
    view = base[:60].view(SHAPE)
    return [
        ("negated input", lambda: K.cfg_combine(t[0], torch._neg_view(t[1]), 2.0)),
        ("negated out", lambda: K.generator_grad(t[0], t[1], t[2], out=torch._neg_view(torch.zeros(SHAPE)))),
        ("transposed", lambda: K.cfg_combine(t[0], t[1].transpose(0, 2).contiguous().transpose(0, 2), 2.0)),
        ("shape", lambda: K.ta_loss(t[0], t[1][:2], s)),
        ("dtype mix", lambda: K.huber_terms(t[0], t[1].half(), t[2], s, 0.1)),
        ("float64", lambda: K.add_noise(t[0].double(), s, 1)),
        ("bad sigma", lambda: K.add_noise(t[0], torch.tensor([1.0, float("nan"), 2.0]), 1)),
        ("sigma shape", lambda: K.ta_loss(t[0], t[1], s[:2])),
        ("edm without sigma", lambda: K.ta_loss(t[0], t[1])),
        ("omega without d_uncond", lambda: K.generator_grad(t[0], t[1], t[2], omega=2.0)),
        ("out overlaps an input", lambda: K.cfg_combine(view, t[1], 2.0, out=view)),
        ("scalar", lambda: K.generator_grad(torch.tensor(1.0), t[1], t[2])),
        ("empty", lambda: K.fill_normal(torch.zeros(0), 1)),
        ("seed", lambda: K.fill_uniform(torch.zeros(3), -1)),
        ("omega", lambda: K.cfg_combine(t[0], t[1], float("inf"))),
        ("weighting", lambda: K.huber_terms(t[0], t[1], t[2], s, 0.1, weighting="x")),
        ("need_grad", lambda: K.ta_loss(t[0], t[1], s, need_grad=2)),
        ("flow", lambda: K.add_noise(t[0], s, 1, flow="yes")),
        ("not a tensor", lambda: K.cfg_combine(t[0], [1.0], 2.0)),
        ("sparse", lambda: K.cfg_combine(t[0], t[1].to_sparse(), 2.0)),
        ("meta", lambda: K.cfg_combine(t[0], torch.zeros(SHAPE, device="meta"), 2.0)),
        ("subclass", lambda: K.cfg_combine(t[0], t[1].as_subclass(_Sub), 2.0)),
    ]


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("what, call", _hand_back_cases(), ids=[w for w, _ in _hand_back_cases()])
def test_hand_back_gives_the_checked_paths_result(monkeypatch: pytest.MonkeyPatch, what: str, call: Any) -> None:
    """Each case either raises exactly what the checked path raises or returns what it returns."""
    def outcome(fn: Callable[[], Any]) -> Any:
        try:
            return _flat(fn())
        except Exception as error:  # noqa: BLE001
            return type(error), str(error)

    want, got = _checked(monkeypatch, lambda: outcome(call)), outcome(call)
    if isinstance(want, tuple):
        assert got == want
    else:
        for a, b in zip(got, want, strict=True):
            _same(a, b)


def test_entries_hand_back_untouched() -> None:
    t, s = _data(torch.float32, 4), _sigma(4)
    out = torch.zeros(SHAPE)
    assert _core.cfg_combine(t[0], torch._neg_view(t[1]), out, 2.0, fast=FAST) is NotImplemented
    assert _core.cfg_combine(t[0], t[1], out, "2", fast=FAST) is NotImplemented
    assert _core.fill_uniform(torch._neg_view(out), 1, fast=FAST) is NotImplemented
    assert _core.add_noise(t[0], s.double(), out, 1, fast=FAST) is NotImplemented
    assert not out.any()
    with pytest.raises(TypeError, match="fast must be a tuple"):
        _core.cfg_combine(t[0], t[1], out, 2.0, fast=1)
    assert _core.cfg_combine(t[0], t[1], out, 2.0, fast=FAST) is None
    assert torch.equal(out, K.cfg_combine(t[0], t[1], 2.0))


def test_forced_reference_and_numpy_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    t, s = _data(torch.float32, 5), _sigma(5)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the C entry ran")

    monkeypatch.setattr(_core, "ta_loss", refuse)
    with K.use_backend("reference"):
        res = K.ta_loss(t[0], t[1], s)
    assert isinstance(res.loss, torch.Tensor)
    monkeypatch.undo()
    res = K.ta_loss(t[0].numpy(), t[1].numpy(), s.numpy())
    assert all(isinstance(x, np.ndarray) for x in res)


def test_fast_path_outputs_stay_on_the_cpu_whatever_the_default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-sample outputs are made on the CPU, so a non-CPU default device (here meta) neither hands the call
    back to the checked path nor changes a bit."""
    t, s = _data(torch.float32, 3), _sigma(3)
    want = _checked(monkeypatch, lambda: CALLS["generator_grad"](t, s))
    with torch.device("meta"):
        got = _fast_only(monkeypatch, lambda: CALLS["generator_grad"](t, s))
    for a, b in zip(_flat(got), _flat(want), strict=True):
        _same(a, b)
