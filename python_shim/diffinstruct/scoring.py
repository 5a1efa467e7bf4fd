"""Reward statistics of images: every metric whose weights are found locally, per prompt group.

Every metric of a list (default: all of METRICS) whose weights are found locally is run; the others are skipped,
each with the reason (the missing file and where to put it). The report gives, per metric, the mean, the standard
deviation (population, ddof=0), min, max and count, overall and per prompt group (the four HPSv2 styles).
`diffinstruct eval --images DIR` and `eval --checkpoint RUN --prompts SET` (run/commands.py) feed it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import replacing
from .errors import ConfigError
from .prompt_sets import Item

# model rewards first (the paper's metrics), then the weight-free built-ins
METRICS = ("imagereward", "pickscore", "hpsv2", "aesthetic", "clip", "brightness", "saturation", "color_match")
PROMPT_FREE = ("aesthetic", "brightness", "saturation", "preference")


def read_image(path: Path) -> Any:
    """An RGB image file as a float tensor [3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("reading images needs pillow (pip install pillow)") from exc
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def save_png_atomic(image: Any, path: Path) -> None:
    """image [3, H, W] in [0, 1] -> 8-bit PNG, written to a temporary name and renamed into place."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).mul(255).round().to("cpu").byte().permute(1, 2, 0).numpy())
    with replacing(path) as tmp:
        Image.fromarray(arr, "RGB").save(tmp, format="PNG")


# ============================================================================================== metrics
def load_metrics(specs: Sequence[str], models_dir: str | None, have_prompts: bool,
                 **opts: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> scorer, name -> reason skipped). A metric is skipped when its weights are missing, its model is not
    available, or it needs prompts and there are none; any other error (a bad spec, a corrupt file) is raised."""
    from .errors import RewardWeightsNotFound
    from .rewards import load_spec
    from .rewards.registry import canonical, check_spec

    scorers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        try:
            terms = check_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"--metrics {spec!r}: {exc}") from None
        if not have_prompts and any(canonical(n) not in PROMPT_FREE for _, n, _ in terms):
            skipped[spec] = "needs prompts, and the images have none (pass --prompts)"
            continue
        try:
            scorers[spec] = load_spec(spec, models_dir=models_dir, **opts)
        except RewardWeightsNotFound as exc:
            skipped[spec] = str(exc)
        except (NotImplementedError, ImportError) as exc:
            skipped[spec] = f"{type(exc).__name__}: {exc}"
    return scorers, skipped


def summarise(values: Sequence[float]) -> dict[str, float | int]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / n
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values), "count": n}


def score_batches(scorers: dict[str, Any], batches: Iterator[tuple[Any, list[Item]]],
                  progress: bool = False, total: int | None = None) -> dict[str, list[tuple[float, str]]]:
    """Runs every scorer on each batch of images; returns name -> [(score, group)] in item order."""
    import torch

    results: dict[str, list[tuple[float, str]]] = {name: [] for name in scorers}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="evaluate", file=sys.stderr)
    with torch.no_grad():
        for images, items in batches:
            prompts = [it.prompt for it in items]
            for name, scorer in scorers.items():
                scores = scorer(images, prompts).detach().double().cpu().reshape(-1).tolist()
                if len(scores) != len(items):
                    raise RuntimeError(f"metric {name} returned {len(scores)} scores for {len(items)} images")
                results[name].extend(zip(scores, (it.group for it in items), strict=True))
            if bar is not None:
                bar.update(len(items))
    if bar is not None:
        bar.close()
    return results


def report(results: dict[str, list[tuple[float, str]]], skipped: dict[str, str], **info: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name, scored in results.items():
        values = [s for s, _ in scored]
        if not values:
            continue
        entry: dict[str, Any] = summarise(values)
        non_finite = sum(1 for v in values if not math.isfinite(v))
        if non_finite:
            entry["non_finite"] = non_finite
        groups = sorted({g for _, g in scored if g})
        if len(groups) > 1:
            entry["groups"] = {g: summarise([s for s, gg in scored if gg == g]) for g in groups}
        metrics[name] = entry
    return {**info, "metrics": metrics, "skipped": skipped}


def format_table(rep: dict[str, Any]) -> str:
    rows = [("metric", "group", "mean", "std", "min", "max", "count")]
    for name, m in rep["metrics"].items():
        rows.append((name, "all", f"{m['mean']:.4f}", f"{m['std']:.4f}", f"{m['min']:.4f}", f"{m['max']:.4f}",
                     str(m["count"])))
        for g, gm in m.get("groups", {}).items():
            rows.append((name, g, f"{gm['mean']:.4f}", f"{gm['std']:.4f}", f"{gm['min']:.4f}", f"{gm['max']:.4f}",
                         str(gm["count"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, why in rep["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def image_batches(items: list[Item], batch: int) -> Iterator[tuple[Any, list[Item]]]:
    """Consecutive images of equal size, up to `batch` at a time."""
    import torch

    group: list[Item] = []
    tensors: list[Any] = []
    for it in items:
        assert it.image is not None
        t = read_image(it.image)
        if tensors and (t.shape != tensors[0].shape or len(tensors) == batch):
            yield torch.stack(tensors), group
            group, tensors = [], []
        group.append(it)
        tensors.append(t)
    if tensors:
        yield torch.stack(tensors), group
