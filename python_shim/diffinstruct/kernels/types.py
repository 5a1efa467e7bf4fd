"""Result records of the fused kernels."""

from __future__ import annotations

from typing import Any, NamedTuple


class TALoss(NamedTuple):
    """Per-sample TA loss lambda_b * scale * sum (D_TA - x0)^2, its gradient, non-finite counts."""

    loss: Any
    grad: Any
    nonfinite: Any


class GeneratorGrad(NamedTuple):
    """G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B and its per-sample diagnostics."""

    grad: Any
    weight: Any
    ref_dist: Any
    gap: Any
    surrogate: Any
    nonfinite: Any


class HuberTerms(NamedTuple):
    """DI* pieces: scaled vectors a, b, d'(y); per-sample |y|^2, y.r, h, w d(y), non-finite counts."""

    a: Any
    b: Any
    dprime: Any
    ysq: Any
    yr: Any
    h: Any
    value: Any
    nonfinite: Any
