"""Rewards by name, and weighted combinations from a spec string.

    load_scorer("pickscore", models_dir="/ComfyUI/models")
    load_spec("0.5*pickscore+2*aesthetic@/weights/aes.safetensors+color_match", models_dir=...)

A spec is terms joined by '+'; each term is [WEIGHT*]NAME[@PATH]. The result is an `ImageScorer` (images in
[0, 1] + prompts -> [B]); wrap it with `LatentToImageReward` or `PixelReward` to hand it to the trainer.
"""

from __future__ import annotations

import os
import re
from typing import Any

from torch import nn

from .base import WeightedRewards
from .builtin import BUILTIN

PathLike = str | os.PathLike[str]

MODEL_REWARDS = ("clip", "pickscore", "aesthetic", "preference")
NOT_YET = {
    "imagereward": "ImageReward (BLIP ViT-L + BERT cross-attention + MLP) is not implemented yet; see docs/REWARDS.md",
    "hpsv2": "HPSv2 (open_clip ViT-H-14 -> transformers CLIPModel key conversion) is not implemented yet; "
             "see docs/REWARDS.md",
}
NAMES = tuple(BUILTIN) + MODEL_REWARDS + tuple(NOT_YET)
_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*)?(?P<name>[a-z_0-9]+)\s*(?:@(?P<path>.+))?$")


def load_scorer(name: str, path: PathLike | None = None, *, models_dir: PathLike | None = None,
                **opts: Any) -> nn.Module:
    """The scorer `name` (see NAMES); model rewards load from `path` or the models folder, offline."""
    key = name.lower().replace("-", "_")
    key = {"clip_score": "clip", "clipscore": "clip", "aesthetics": "aesthetic", "hps": "hpsv2", "ir": "imagereward",
           "colour_match": "color_match", "color": "color_match"}.get(key, key)
    if key in BUILTIN:
        return BUILTIN[key]()
    if key in NOT_YET:
        raise NotImplementedError(NOT_YET[key])
    if key == "clip":
        from .clip import load_clip_score

        return load_clip_score(path, models_dir=models_dir, **opts)
    if key == "pickscore":
        from .clip import load_pickscore

        return load_pickscore(path, models_dir=models_dir, **opts)
    if key == "aesthetic":
        from .clip import load_aesthetic

        return load_aesthetic(path, models_dir=models_dir, **opts)
    if key == "preference":
        from .preference import PreferenceModel

        if path is None:
            raise ValueError("the preference reward needs a path: preference@/path/to/model.safetensors")
        return PreferenceModel.load(path)
    raise ValueError(f"unknown reward {name!r}; available: {', '.join(NAMES)}")


def parse_spec(spec: str) -> list[tuple[float, str, str | None]]:
    """'0.5*pickscore+aesthetic@/p' -> [(0.5, 'pickscore', None), (1.0, 'aesthetic', '/p')]."""
    terms = []
    for part in spec.split("+"):
        if not part.strip():
            continue
        m = _TERM.match(part)
        if m is None:
            raise ValueError(f"bad reward term {part!r} in {spec!r} (expected [WEIGHT*]NAME[@PATH])")
        terms.append((float(m["w"]) if m["w"] else 1.0, m["name"], m["path"].strip() if m["path"] else None))
    if not terms:
        raise ValueError(f"empty reward spec {spec!r}")
    return terms


def load_spec(spec: str, *, models_dir: PathLike | None = None, **opts: Any) -> nn.Module:
    """A single scorer (weight 1, one term) or a `WeightedRewards` of scorers. `opts` go to model rewards."""
    terms = parse_spec(spec)
    scorers = []
    for _, name, path in terms:
        key = name.lower()
        scorers.append(load_scorer(name, path, models_dir=models_dir,
                                   **(opts if key not in BUILTIN and key != "preference" else {})))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return scorers[0]
    return WeightedRewards(scorers, [w for w, _, _ in terms])
