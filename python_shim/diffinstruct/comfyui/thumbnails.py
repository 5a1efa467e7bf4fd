"""Thumbnails for the Templates browser: a drawing of each shipped workflow's graph, saved beside it.

    python -m diffinstruct.comfyui.thumbnails workflows/

ComfyUI's frontend shows `<template>.jpg` from the pack's template folder as the template's picture
(docs/COMFYUI.md section 11). The drawing is the graph as it opens: node boxes at their positions with their
titles (the pack's nodes in its colour, core nodes grey) and the links between them, so a user sees the shape of
the pipeline before loading it. Pillow draws it; the result is deterministic for one Pillow version.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ..atomic import replacing

SIZE = (512, 384)  # the frontend's template cards are 4:3
MARGIN = 16
BACKGROUND = (32, 32, 36)
LINK = (150, 160, 175)
OURS = (88, 64, 140)  # title bars of the pack's nodes
CORE = (70, 70, 78)
BODY = (52, 52, 58)
TEXT = (235, 235, 240)
TITLE_H = 30  # litegraph draws a node's title bar above its position


def _title(node: dict[str, Any]) -> str:
    if node.get("title"):
        return str(node["title"])
    kind = str(node["type"])
    if not kind.startswith("DIPP"):
        return kind
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind[4:])
    return f"DI++ {words}"


def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    """`text` cut (with an ellipsis) to `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _boxes(workflow: dict[str, Any]) -> dict[int, tuple[float, float, float, float]]:
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in workflow["nodes"]}


def render(workflow: dict[str, Any]) -> Any:
    """A PIL image of the graph, scaled to fit SIZE."""
    from PIL import Image, ImageDraw, ImageFont

    boxes = _boxes(workflow)
    x0 = min(b[0] for b in boxes.values())
    y0 = min(b[1] for b in boxes.values())
    x1 = max(b[2] for b in boxes.values())
    y1 = max(b[3] for b in boxes.values())
    scale = min((SIZE[0] - 2 * MARGIN) / (x1 - x0), (SIZE[1] - 2 * MARGIN) / (y1 - y0))
    ox = (SIZE[0] - (x1 - x0) * scale) / 2
    oy = (SIZE[1] - (y1 - y0) * scale) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    for link in workflow.get("links", []):  # [id, from node, from slot, to node, to slot, type]
        a, b = boxes[link[1]], boxes[link[3]]
        draw.line([at(a[2], a[1] + TITLE_H + 20 * link[2]), at(b[0], b[1] + TITLE_H + 20 * link[4])], fill=LINK,
                  width=2)
    font = ImageFont.load_default(size=max(8, int(22 * scale)))
    for node in workflow["nodes"]:
        left, top, right, bottom = boxes[node["id"]]
        (x_l, y_t), (x_r, y_b) = at(left, top), at(right, bottom)
        bar = y_t + TITLE_H * scale
        draw.rounded_rectangle([x_l, y_t, x_r, y_b], radius=4, fill=BODY)
        draw.rounded_rectangle([x_l, y_t, x_r, bar], radius=4, fill=OURS if node["type"].startswith("DIPP") else CORE)
        draw.text((x_l + 4, y_t + 2), _fit(draw, _title(node), font, x_r - x_l - 8), fill=TEXT, font=font)
    return image


def write_thumbnails(folder: Path) -> list[Path]:
    """`<name>.jpg` beside every `<name>.json` UI workflow in `folder` (each written atomically)."""
    written = []
    for path in sorted(folder.glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        target = path.with_suffix(".jpg")
        with replacing(target) as tmp:
            render(workflow).save(tmp, format="JPEG", quality=90)
        written.append(target)
    return written


if __name__ == "__main__":
    for written_path in write_thumbnails(Path(sys.argv[1] if len(sys.argv) > 1 else "workflows")):
        print(written_path)
