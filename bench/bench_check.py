"""Validation before timing: a fused kernel, and every contender, must agree with the PyTorch reference.

`against_reference` runs one call on copies of the first buffer set on the default backend and on the
reference backend and compares outputs; `contender_agrees` compares a contender's outputs (torch.compile of
the same formula, torch.optim.Adam, torch._foreach_lerp_) with the reference's, each cast to float64, at the
tolerance of the lower-precision dtype of the two (torch's optimiser keeps bfloat16 moments for bfloat16
parameters, the reference float32 ones).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffinstruct import kernels as K

# Per output dtype: the fused kernels compute in float32 (reductions in float64 chunks), the reference
# in float64/float32, each rounds once to the output dtype; atol is relative to the output's magnitude.
CHECK_TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _outputs(result: object) -> list[torch.Tensor]:
    if result is None:
        return []
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _outputs(item)]
    return [torch.as_tensor(result)]


def _copy(d: object) -> object:
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d.clone() if isinstance(d, torch.Tensor) else d


def against_reference(kernel: str, run: Callable[[object], object], first_set: object) -> None:
    """Raises unless run(a copy of first_set) on the default backend equals it on the PyTorch reference."""
    got = _outputs(run(_copy(first_set)))
    with K.use_backend("reference"):
        want = _outputs(run(_copy(first_set)))
    if not got or len(got) != len(want):
        raise AssertionError(f"{kernel}: {len(got)} outputs, the reference gives {len(want)}")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{kernel}: output {i} is {a.dtype}{tuple(a.shape)}, the reference's "
                                 f"{b.dtype}{tuple(b.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise AssertionError(f"{kernel}: output {i} (integers) differs from the reference")
            continue
        rtol, atol = CHECK_TOLERANCE[a.dtype]
        scale = max(1.0, float(b.double().abs().max()))
        try:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale, equal_nan=True)
        except AssertionError as error:
            raise AssertionError(f"{kernel}: output {i} differs from the PyTorch reference: {error}") from None



def reference_outputs(run: Callable[[object], object], first_set: object) -> list[torch.Tensor]:
    with K.use_backend("reference"):
        return _outputs(run(_copy(first_set)))


def contender_agrees(kernel: str, name: str, contender: Callable[[object], object],
                     reference: Callable[[object], object], first_set: object) -> None:
    """Raises unless contender(a copy of first_set) gives the outputs of reference (the fused call on the
    PyTorch reference backend) up to the tolerance of the lower-precision dtype of each pair."""
    got = _outputs(contender(_copy(first_set)))
    want = reference_outputs(reference, first_set)
    if len(got) != len(want):
        raise AssertionError(f"{kernel} / {name}: {len(got)} outputs, the reference gives {len(want)}")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            raise AssertionError(f"{kernel} / {name}: output {i} has shape {tuple(a.shape)}, the reference's "
                                 f"{tuple(b.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            if not torch.equal(a.long(), b.long()):
                raise AssertionError(f"{kernel} / {name}: output {i} (integers) differs from the reference")
            continue
        low = a.dtype if a.element_size() < b.element_size() else b.dtype
        rtol, atol = CHECK_TOLERANCE[low]
        scale = max(1.0, float(b.double().abs().max()))
        try:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale, equal_nan=True)
        except AssertionError as error:
            raise AssertionError(f"{kernel} / {name}: output {i} differs from the PyTorch reference: "
                                 f"{error}") from None
