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

MODEL_REWARDS = ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", "preference")
NAMES = tuple(BUILTIN) + MODEL_REWARDS
_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*)?"
                   r"(?P<name>[A-Za-z_0-9.\-]+)\s*(?:@(?P<path>.+))?$")


ALIASES = {"clip_score": "clip", "clipscore": "clip", "aesthetics": "aesthetic", "hps": "hpsv2", "hpsv2.1": "hpsv2",
           "ir": "imagereward", "image_reward": "imagereward", "colour_match": "color_match", "color": "color_match"}


def canonical(name: str) -> str:
    """The registry name for `name` or one of its aliases (case-insensitive); unknown names come back as given."""
    key = name.lower().replace("-", "_")
    return ALIASES.get(key, key)


def load_scorer(name: str, path: PathLike | None = None, *, models_dir: PathLike | None = None,
                **opts: Any) -> nn.Module:
    """The scorer `name` (see NAMES); model rewards load from `path` or the models folder, offline."""
    key = canonical(name)
    if key in BUILTIN:
        return BUILTIN[key]()
    if key == "clip":
        from .clip import load_clip_score

        return load_clip_score(path, models_dir=models_dir, **opts)
    if key == "pickscore":
        from .clip import load_pickscore

        return load_pickscore(path, models_dir=models_dir, **opts)
    if key == "aesthetic":
        from .clip import load_aesthetic

        return load_aesthetic(path, models_dir=models_dir, **opts)
    if key == "imagereward":
        from .imagereward import load_imagereward

        return load_imagereward(path, models_dir=models_dir, **opts)
    if key == "hpsv2":
        from .hpsv2 import load_hpsv2

        return load_hpsv2(path, models_dir=models_dir, **opts)
    if key == "preference":
        from .preference import PreferenceModel

        if path is None:
            raise ValueError("the preference reward needs a path: preference@/path/to/model.safetensors")
        return PreferenceModel.load(path)
    raise ValueError(f"unknown reward {name!r}; available: {', '.join(NAMES)}")


def parse_spec(spec: str) -> list[tuple[float, str, str | None]]:
    """'0.5*pickscore+aesthetic@/p' -> [(0.5, 'pickscore', None), (1.0, 'aesthetic', '/p')].

    A path may contain '+' (the LAION head is sac+logos+ava1-l14-linearMSE.safetensors): after a term with a path,
    a '+' starts a new term only if what follows is [WEIGHT*]NAME with NAME a known reward."""
    parts: list[str] = []
    for part in spec.split("+"):
        m = _TERM.match(part)
        new_term = m is not None and canonical(m["name"]) in NAMES
        if parts and "@" in parts[-1] and not new_term:
            parts[-1] += "+" + part
        else:
            parts.append(part)
    terms = []
    for part in parts:
        if not part.strip():
            continue
        m = _TERM.match(part)
        if m is None:
            raise ValueError(f"bad reward term {part!r} in {spec!r} (expected [WEIGHT*]NAME[@PATH])")
        terms.append((float(m["w"]) if m["w"] else 1.0, m["name"], m["path"].strip() if m["path"] else None))
    if not terms:
        raise ValueError(f"empty reward spec {spec!r}")
    return terms


def check_spec(spec: str) -> list[tuple[float, str, str | None]]:
    """Parses `spec` and checks its names (ValueError naming the bad term) without loading anything."""
    terms = parse_spec(spec)
    for _, name, path in terms:
        key = canonical(name)
        if key not in NAMES:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; available: {', '.join(NAMES)}")
        if key == "preference" and path is None:
            raise ValueError("the preference reward needs a path: preference@/path/to/model.safetensors")
    return terms


def load_spec(spec: str, *, models_dir: PathLike | None = None, **opts: Any) -> nn.Module:
    """A single scorer (weight 1, one term) or a `WeightedRewards` of scorers. `opts` go to model rewards."""
    terms = parse_spec(spec)
    scorers = []
    for _, name, path in terms:
        key = canonical(name)
        scorers.append(load_scorer(name, path, models_dir=models_dir,
                                   **(opts if key not in BUILTIN and key != "preference" else {})))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return scorers[0]
    return WeightedRewards(scorers, [w for w, _, _ in terms])
