"""Inputs and checks the per-op tests (tests/ops/) share: seeded tensors, tolerances, and running one
call on every backend that can run it here (the same error, the same results, the same bits twice)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from conftest import TOLERANCES, as64
from diffinstruct import kernels as K
from diffinstruct.kernels import registry

SHAPES = [(1, 5), (3, 4, 7, 9), (2, 4, 32, 40)]  # per_sample: 5, 252, 5120 (not multiples of 32/1024)
REDUCTION_RTOL = 1e-5
LIST_SHAPES = [(3,), (17, 5), (4, 33, 9), (2100,)]  # the optimizers' parameter lists
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION_IDS = ["f32", "f16", "bf16"]


def make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def assert_elementwise(out, want, dtype):
    tol = TOLERANCES[dtype]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(as64(out), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def sigma_for(batch):
    return torch.tensor([0.05, 0.7, 2.5, 11.0, 0.3][:batch] + [1.3] * max(0, batch - 5), dtype=torch.float32)


def tensors(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in LIST_SHAPES]


def grad_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x0 (a leaf that requires grad), D_TA, D_cond, D_uncond and a sigma that requires grad."""
    from core_args import B, N, tt

    x0 = tt(B, N, dtype=dtype, requires_grad=True)
    d_ta, d_cond, d_uncond = (tt(B, N, dtype=dtype) + k for k in (0.1, 0.2, 0.3))
    sigma = torch.tensor([0.5, 2.0], requires_grad=True)
    return x0, d_ta, d_cond, d_uncond, sigma


# ---------------------------------------------------------------------------------------------- backends

CPU_BACKENDS = [name for name in ("cpu", "reference") if registry.unavailable_reason(name) is None]


def _error(call: Callable[[], Any], backend: str) -> tuple[type[BaseException], str]:
    with K.use_backend(backend):
        try:
            call()
        except Exception as error:  # the outcome under test
            return type(error), str(error)
    raise AssertionError(f"the call succeeded on {backend}")


def assert_same_error(call: Callable[[], Any]) -> None:
    """The call fails on every backend here with the same exception type and message."""
    errors = {name: _error(call, name) for name in CPU_BACKENDS}
    assert len(set(errors.values())) == 1, errors


def _flat(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, dict):
        return [v for k in sorted(result) for v in _flat(result[k])]
    if isinstance(result, (tuple, list)):
        return [v for item in result for v in _flat(item)]
    return [result]


def on(backend: str, call: Callable[[], Any]) -> list[Any]:
    """The call's outputs (its result, or what it updated in place when it returns what it updated)."""
    with K.use_backend(backend):
        return [torch.as_tensor(v).clone() if isinstance(v, np.ndarray) else v.clone() for v in _flat(call())]


def assert_backends_agree(call: Callable[[], Any], rtol: float = 2e-5, atol: float = 2e-5) -> None:
    """Every backend here gives the same outputs: exactly for integers, within rtol and atol (times the
    output's magnitude, at least 1) for float32, and within the dtype's tolerance below float32."""
    results = {name: on(name, call) for name in CPU_BACKENDS}
    base = results[CPU_BACKENDS[0]]
    for name, got in results.items():
        assert len(got) == len(base), name
        for i, (a, b) in enumerate(zip(got, base, strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
            if not a.is_floating_point():
                assert torch.equal(a, b), (name, i)
                continue
            tol = {"rtol": rtol, "atol": atol} if a.dtype == torch.float32 else TOLERANCES[a.dtype]
            scale = max(1.0, float(b.double().abs().max()))
            torch.testing.assert_close(a.double(), b.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       msg=lambda m, name=name, i=i: f"{name}, output {i}: {m}")


def assert_deterministic(call: Callable[[], Any]) -> None:
    """On every backend here, the same call twice gives the same bits."""
    for name in CPU_BACKENDS:
        first, second = on(name, call), on(name, call)
        assert len(first) == len(second), name
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (name, i)


def calls(*groups: Sequence[Any]) -> list[Any]:
    """The calls of pytest.param(call, exc, match, id=...) lists and of (id, call) pairs, as
    pytest.param(call, id=...), marks kept."""
    import pytest

    params = []
    for group in groups:
        for p in group:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                params.append(pytest.param(p[1], id=p[0]))
            else:
                params.append(pytest.param(p.values[0], id=p.id, marks=p.marks))
    return params
