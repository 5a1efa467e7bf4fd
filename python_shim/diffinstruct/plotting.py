"""PNG figures (training curves, 2-D sample scatter) with matplotlib's Agg canvas.

Uses Figure + FigureCanvasAgg directly, so it never touches pyplot's global backend (safe inside a host
application such as ComfyUI). matplotlib is an optional dependency: `plotting_available()` says whether it
is installed, and every function raises ImportError with an install hint when it is not.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import replacing

# (metric key, panel title); a panel is drawn when its key has at least one finite value
CURVES = (
    ("ta_loss", "TA loss"),
    ("surrogate", "generator surrogate loss"),
    ("divergence", "DI* divergence"),
    ("reward", "reward (batch mean)"),
    ("gap", "|D_TA - D_ref| (mean)"),
    ("generator_grad_norm", "generator grad norm"),
)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:  # readers never see half a PNG
        fig.savefig(tmp, format="png")
    return out


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc, n = [], 0.0, 0
    buf: list[float] = []
    for v in values:
        buf.append(v)
        acc += v
        n += 1
        if n > window:
            acc -= buf[-window - 1]
            n -= 1
        out.append(acc / n)
    return out


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path | None:
    """Loss / reward curves against step; one panel per metric present. None when there is nothing to plot."""
    panels = []
    for key, label in CURVES:
        pts = [(r["step"], float(r[key])) for r in records
               if r.get("step") is not None and isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if pts:
            panels.append((label, pts))
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = _figure(5.0 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    window = max(1, len(records) // 50)
    for ax, (label, pts) in zip(axes.flat, panels, strict=False):
        steps = [p[0] for p in pts]
        values = [p[1] for p in pts]
        ax.plot(steps, values, lw=0.6, alpha=0.4, color="C0")
        if window > 1:
            ax.plot(steps, _smooth(values, window), lw=1.4, color="C0")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(points: Any, labels: Any, path: str | os.PathLike[str], *, means: Any = None, target: Any = None,
                 reference: Any = None, title: str = "") -> Path:
    """Scatter of 2-D samples coloured by class; optional reference samples, class means and reward target."""
    import numpy as np

    pts = np.asarray(points, dtype=np.float64)
    lab = np.asarray(labels)
    fig = _figure(7.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.75", label="reference", rasterized=True)
    for k in np.unique(lab):
        sel = lab == k
        ax.scatter(pts[sel, 0], pts[sel, 1], s=4, color=f"C{int(k) % 10}", label=f"class {int(k)}", rasterized=True)
    if means is not None:
        mu = np.asarray(means, dtype=np.float64)
        ax.scatter(mu[:, 0], mu[:, 1], marker="x", s=60, c="k", label="class means")
    if target is not None:
        t = np.asarray(target, dtype=np.float64).reshape(-1)
        ax.scatter([t[0]], [t[1]], marker="*", s=160, c="red", label="reward target")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
