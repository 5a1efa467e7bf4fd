"""`python -m diffinstruct evaluate`: reward statistics of a folder of images, or of a generator over a prompt set.

    python -m diffinstruct evaluate --images DIR [--prompts prompts.jsonl|prompts.tsv] [--metrics all|LIST]
    python -m diffinstruct evaluate --checkpoint RUN --prompts coco1k|hpsv2|hpsv2:photo|FILE [--n N] [--seed S]

Every metric of `--metrics` (default: all of METRICS) whose weights are found locally is run; the others are
skipped, each with the reason (the missing file and where to put it). The report gives, per metric, the mean,
the standard deviation (population, ddof=0), min, max and count, overall and per prompt group (the four HPSv2
styles); it is printed as a table, and as JSON with --json or to --out.

Protocols of the DI++ paper, when the weights are present under the models folder (see rewards/paths.py):
  * 1k COCO-2017 validation prompts: `--prompts coco1k` (data/prompts/README.md gives the selection rule);
  * HPSv2 benchmark: `--prompts hpsv2 --metrics hpsv2` (4 styles x 800 prompts, reported per style).

Prompt files: .txt (one prompt per line), .json (a list of prompts, or an object of named lists = groups),
.jsonl (objects with "prompt", optional "group"), .tsv (a "prompt" or "caption" column, or the last column).
For --images, the prompt file maps images to prompts: .jsonl objects {"image": "name.png", "prompt": "..."} or a
.tsv with an image column and a prompt column; without --prompts, DIR/prompts.jsonl or DIR/prompts.tsv is used
if present, else only the prompt-free metrics run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, int_at_least

DATA_DIR = Path(__file__).resolve().parent / "data" / "prompts"
PROMPT_SETS = {"coco1k": "coco2017_val_1k.txt", "hpsv2": "hpsv2_benchmark_prompts.json"}
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
# model rewards first (the paper's metrics), then the weight-free built-ins
METRICS = ("imagereward", "pickscore", "hpsv2", "aesthetic", "clip", "brightness", "saturation", "color_match")
PROMPT_FREE = ("aesthetic", "brightness", "saturation", "preference")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    prompt: str
    group: str = ""
    image: Path | None = None


# ============================================================================================== prompt files
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompt file {path}: {exc}") from None


def _json_items(path: Path, data: Any) -> list[Item]:
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [Item(p) for p in data]
    if isinstance(data, dict) and data and all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                               for v in data.values()):
        return [Item(p, str(group)) for group, prompts in data.items() for p in prompts]
    raise ConfigError(f"{path}: expected a JSON list of prompts or an object of named prompt lists")


def _tsv_rows(text: str) -> list[list[str]]:
    # QUOTE_NONE: prompts may begin with a literal '"' (PartiPrompts), which csv would otherwise strip
    rows = list(csv.reader(io.StringIO(text.replace("\r\n", "\n")), delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in rows if r and any(c.strip() for c in r)]


def load_prompts(name_or_path: str) -> list[Item]:
    """Prompts (with their group) of a named set (coco1k, hpsv2, hpsv2:STYLE) or a .txt/.json/.jsonl/.tsv file."""
    key = name_or_path.strip().lower()
    style = None
    if key.startswith("hpsv2:"):
        key, style = "hpsv2", key.split(":", 1)[1]
        if style not in HPSV2_STYLES:
            raise ConfigError(f"--prompts {name_or_path!r}: unknown HPSv2 style {style!r}; choose one of "
                              f"{', '.join(HPSV2_STYLES)}")
    if key in PROMPT_SETS:
        path = DATA_DIR / PROMPT_SETS[key]
        if not path.is_file():
            raise ConfigError(f"the packaged prompt set {path} is missing (reinstall diffinstruct)")
        items = _json_items(path, json.loads(path.read_text(encoding="utf-8"))) if path.suffix == ".json" else [
            Item(line, "coco2017_val_1k") for line in path.read_text(encoding="utf-8").splitlines() if line]
        if style is not None:
            items = [it for it in items if it.group == style]
        return items
    path = Path(name_or_path).expanduser()
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        items = [Item(line.strip()) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        try:
            items = _json_items(path, json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    elif suffix == ".jsonl":
        items = [Item(str(rec["prompt"]), str(rec.get("group", ""))) for rec in _jsonl(path, text, ("prompt",))]
    elif suffix == ".tsv":
        rows = _tsv_rows(text)
        header = [c.strip().lower() for c in rows[0]] if rows else []
        col = next((header.index(c) for c in ("prompt", "prompts", "caption", "text") if c in header), None)
        body = rows[1:] if col is not None else rows
        col = col if col is not None else -1
        items = [Item(r[col].strip()) for r in body if len(r) > max(col, 0) and r[col].strip()]
    else:
        raise ConfigError(f"--prompts {path}: unknown prompt file type {suffix!r} (use .txt, .json, .jsonl or .tsv, "
                          f"or a named set: {', '.join(PROMPT_SETS)}, hpsv2:STYLE)")
    if not items:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return items


def _jsonl(path: Path, text: str, need: Sequence[str]) -> Iterator[dict[str, Any]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: not valid JSON: {exc}") from None
        if not isinstance(rec, dict) or any(k not in rec for k in need):
            raise ConfigError(f"{path}:{i}: expected an object with {', '.join(repr(k) for k in need)}")
        yield rec


def image_items(folder: Path, prompts: str | None) -> list[Item]:
    """The images of `folder` with their prompts (from `prompts`, or DIR/prompts.jsonl|tsv, else empty prompts)."""
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a directory")
    if prompts is None:
        found = [folder / n for n in ("prompts.jsonl", "prompts.tsv") if (folder / n).is_file()]
        if not found:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ConfigError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return [Item("", "", p) for p in images]
        prompts = str(found[0])
    path = Path(prompts).expanduser()
    text = _read_text(path)
    keys = ("image", "file", "path", "file_name")
    pairs: list[tuple[str, str, str]] = []
    if path.suffix.lower() == ".jsonl":
        for i, rec in enumerate(_jsonl(path, text, ("prompt",)), 1):
            name = next((rec[k] for k in keys if k in rec), None)
            if not isinstance(name, str):
                raise ConfigError(f"{path}: record {i} names no image (one of the keys {', '.join(keys)})")
            pairs.append((name, str(rec["prompt"]), str(rec.get("group", ""))))
    elif path.suffix.lower() == ".tsv":
        rows = _tsv_rows(text)
        if rows and rows[0][0].strip().lower() in keys:
            rows = rows[1:]
        for i, r in enumerate(rows, 1):
            if len(r) < 2:
                raise ConfigError(f"{path}: row {i} needs an image column and a prompt column (tab-separated)")
            pairs.append((r[0].strip(), r[1], r[2] if len(r) > 2 else ""))
    else:
        raise ConfigError(f"{path}: the image -> prompt file must be .jsonl or .tsv")
    items = []
    for name, prompt, group in pairs:
        image = (folder / name) if not Path(name).is_absolute() else Path(name)
        if not image.is_file():
            raise ConfigError(f"{path}: image {image} does not exist")
        items.append(Item(prompt, group, image))
    if not items:
        raise ConfigError(f"{path} lists no images")
    return items


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(arr, "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


# ============================================================================================== metrics
def load_metrics(specs: Sequence[str], models_dir: str | None, have_prompts: bool,
                 **opts: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> scorer, name -> reason skipped). A metric is skipped when its weights are missing, its model is not
    available, or it needs prompts and there are none; any other error (a bad spec, a corrupt file) is raised."""
    from .rewards import RewardWeightsNotFound, load_spec
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


# ============================================================================================== sources
def _image_batches(items: list[Item], batch: int) -> Iterator[tuple[Any, list[Item]]]:
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


def _generated_batches(args: argparse.Namespace, items: list[Item], save_dir: Path | None
                       ) -> tuple[Iterator[tuple[Any, list[Item]]], dict[str, Any]]:
    from . import cli

    ckpt, spec, meta, built = cli._load_weights(args)
    problem = cli.PROBLEMS[spec.problem]
    info = {"checkpoint": str(ckpt), "step": meta.get("step"), "weights": args.weights, "problem": spec.problem,
            "seed": args.seed}

    def gen() -> Iterator[tuple[Any, list[Item]]]:
        records = []
        for start in range(0, len(items), args.batch):
            part = items[start:start + args.batch]
            # seed + index of the first prompt: a prompt's image does not depend on --batch only if the problem
            # draws noise per sample from that seed; the default batch keeps runs comparable
            images = problem.generate_images(built, spec, [it.prompt for it in part], args.seed + start)
            if tuple(images.shape[1:2]) != (3,) or images.shape[0] != len(part):
                raise RuntimeError(f"problem {spec.problem!r} returned images of shape {tuple(images.shape)} for "
                                   f"{len(part)} prompts (expected [N, 3, H, W])")
            if save_dir is not None:
                for j, (img, it) in enumerate(zip(images, part, strict=True)):
                    name = f"{start + j:05d}.png"
                    save_png_atomic(img, save_dir / name)
                    records.append({"image": name, "prompt": it.prompt, "group": it.group})
            yield images, part
        if save_dir is not None:
            from .checkpoint import write_text_atomic

            write_text_atomic(save_dir / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    return gen(), info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation report for parsed `evaluate` arguments."""
    specs = [s.strip() for s in args.metrics.split(",") if s.strip()] if args.metrics != "all" else list(METRICS)
    if not specs:
        raise ConfigError("--metrics names no metric")
    opts: dict[str, Any] = {}
    if args.device != "cpu":
        opts["device"] = args.device
    if args.images is not None:
        if args.n is not None:
            raise ConfigError("--n applies to --checkpoint (a prompt set), not to --images")
        items = image_items(Path(args.images).expanduser(), args.prompts)
        have_prompts = any(it.prompt for it in items)
        source: dict[str, Any] = {"images": str(args.images), "n_images": len(items)}
    else:
        if args.prompts is None:
            raise ConfigError(f"--checkpoint needs --prompts (a prompt file, or one of {', '.join(PROMPT_SETS)}, "
                              f"hpsv2:STYLE)")
        items = load_prompts(args.prompts)
        if args.n is not None:
            items = items[:args.n]
        have_prompts = True
        source = {"prompts": args.prompts, "n_images": len(items)}
    scorers, skipped = load_metrics(specs, args.models_dir, have_prompts, **opts)
    if not scorers:
        raise ConfigError("no metric could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if args.images is not None:
        batches = _image_batches(items, args.batch)
    else:
        save_dir = Path(args.save_images).expanduser() if args.save_images else None
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
        batches, info = _generated_batches(args, items, save_dir)
        source.update(info)
    if args.device != "cpu":
        batches = ((imgs.to(args.device), part) for imgs, part in batches)
    results = score_batches(scorers, batches, progress=args.progress, total=len(items))
    return report(results, skipped, **source)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import write_text_atomic
    from .metrics import jsonable

    rep = run(args)
    text = json.dumps(jsonable(rep), indent=2, allow_nan=False)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    print(text if args.json else format_table(rep))
    return 0


_positive = int_at_least(1)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="reward statistics of images, or of a generator over a prompt set",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", default=None, help="a folder of images (.png/.jpg/.webp)")
    src.add_argument("--checkpoint", default=None, help="a run directory or step-NNNNNN checkpoint of `train`")
    p.add_argument("--prompts", default=None,
                   help="with --checkpoint: coco1k, hpsv2, hpsv2:STYLE or a .txt/.json/.jsonl/.tsv file; with "
                        "--images: a .jsonl/.tsv mapping image names to prompts")
    p.add_argument("--metrics", default="all",
                   help=f"comma-separated reward specs (default all: {', '.join(METRICS)}); a spec may weight and "
                        "combine rewards, e.g. 0.5*pickscore+aesthetic@/path")
    p.add_argument("--models-dir", default=None, help="models folder holding rewards/<name>/ (default: "
                                                      "$DIFFINSTRUCT_MODELS_DIR or ComfyUI's models folder)")
    p.add_argument("--n", type=_positive, default=None, help="use the first N prompts only")
    p.add_argument("--seed", type=int, default=0, help="generation seed (--checkpoint)")
    p.add_argument("--batch", type=_positive, default=16, help="images per batch")
    p.add_argument("--weights", choices=("ema", "generator"), default="ema", help="generator weights (--checkpoint)")
    p.add_argument("--config", default=None, help="the run's TOML file, when the checkpoint does not record it")
    p.add_argument("--save-images", default=None, help="also save the generated images and prompts.jsonl here")
    p.add_argument("--device", default="cpu", help="torch device for the reward models (default cpu)")
    p.add_argument("--out", default=None, help="write the JSON report to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_evaluate)
    return p
