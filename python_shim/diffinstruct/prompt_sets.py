"""Prompt sets and image folders to evaluate on: the packaged sets (coco1k, hpsv2, hpsv2:STYLE), prompt files, and
the image -> prompt files of an image folder.

Prompt files: .txt (one prompt per line), .json (a list of prompts, or an object of named lists = groups),
.jsonl (objects with "prompt", optional "group"), .tsv (a "prompt" or "caption" column, or the last column).
For an image folder, the prompt file maps images to prompts: .jsonl objects {"image": "name.png", "prompt": "..."}
or a .tsv with an image column and a prompt column; without one, DIR/prompts.jsonl or DIR/prompts.tsv is used if
present, else the images have no prompts. Every problem is a ConfigError naming the file (and line).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data" / "prompts"
PROMPT_SETS = {"coco1k": "coco2017_val_1k.txt", "hpsv2": "hpsv2_benchmark_prompts.json"}
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    prompt: str
    group: str = ""
    image: Path | None = None


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
