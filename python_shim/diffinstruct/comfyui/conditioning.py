"""CONDITIONING -> the engine's conditioning table: prompts or entries through the model's extra_conds, batched
the way each family needs (repeated to one CLIP length, or padded with a mask), with the guidance a
guidance-distilled reference runs at."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from . import host as host

NULL = ""  # PromptList's null prompt: the negative conditioning


def conditioning_table(model: Any, prompts: Sequence[str] | None, clip: Any, positive: Any, negative: Any,
                       latent_hw: tuple[int, int], downscale: int) -> tuple[list[str], dict[str, Any]]:
    """(labels, label -> engine cond): prompts encoded with `clip`, or the positive CONDITIONING's entries;
    the negative conditioning is stored under NULL (the unconditional branch of CFG)."""
    neg = host.conditioning_entries(negative, "negative conditioning")[0]
    if prompts:
        if clip is None:
            raise ConfigError("prompts were given but no CLIP is connected to encode them")
        entries = host.encode_prompts(clip, prompts)
        labels = list(prompts)
        guidance = _guidance_of(positive)
        if guidance is not None:  # FluxGuidance on the reference's conditioning guides every prompt
            entries = {p: [e[0], {**e[1], "guidance": guidance}] for p, e in entries.items()}
    else:
        pos = host.conditioning_entries(positive, "positive conditioning")
        labels = [f"conditioning {i}" for i in range(len(pos))]
        entries = dict(zip(labels, pos, strict=True))
    table = {label: host.encode_conditioning(model, entry, latent_hw, downscale) for label, entry in entries.items()}
    table[NULL] = host.encode_conditioning(model, neg, latent_hw, downscale)
    return labels, same_token_count(table)


def _guidance_of(conditioning: Any) -> float | None:
    if not isinstance(conditioning, list | tuple) or not conditioning:
        return None
    extra = conditioning[0][1] if isinstance(conditioning[0], list | tuple) and len(conditioning[0]) > 1 else {}
    value = extra.get("guidance") if isinstance(extra, dict) else None
    return None if value is None else float(value)


def reference_guidance(model: Any, table: dict[str, Any]) -> float | None:
    """The guidance a guidance-distilled reference runs with (from the conditioning), or None."""
    if not host.guidance_distilled(model):
        return None
    for cond in table.values():
        value = cond.get("guidance") if isinstance(cond, dict) else None
        if isinstance(value, torch.Tensor) and value.numel():
            return float(value.flatten()[0])
    return None


def same_token_count(table: dict[str, Any]) -> dict[str, Any]:
    """Prompts longer than one CLIP window have more tokens; batch them as ComfyUI does (CONDCrossAttn.concat):
    repeat each to the least common multiple of the lengths, which leaves attention's result unchanged.
    A model told its token count (Lumina 2's num_tokens) gets zero padding and an attention mask instead."""
    lengths = {c["c_crossattn"].shape[1] for c in table.values() if isinstance(c, dict) and "c_crossattn" in c}
    if any(isinstance(c, dict) and "num_tokens" in c for c in table.values()):
        return padded_tokens(table)
    if len(lengths) < 2:
        return table
    target = math.lcm(*lengths)
    return {k: ({**c, "c_crossattn": c["c_crossattn"].repeat(1, target // c["c_crossattn"].shape[1], 1)}
                if isinstance(c, dict) and "c_crossattn" in c else c) for k, c in table.items()}


def padded_tokens(table: dict[str, Any]) -> dict[str, Any]:
    """Conditionings that name their count of real tokens, padded to one length with a mask over the real ones,
    so that they batch: num_tokens becomes the common length (the network reads the mask instead)."""
    conds = [c for c in table.values() if isinstance(c, dict) and "c_crossattn" in c]
    counts = {int(c["num_tokens"]) for c in conds if "num_tokens" in c}
    length = max(c["c_crossattn"].shape[1] for c in conds)
    if len(counts) < 2 and all(c["c_crossattn"].shape[1] == length for c in conds):
        return table
    out = {}
    for key, c in table.items():
        if not (isinstance(c, dict) and "c_crossattn" in c):
            out[key] = c
            continue
        cross = c["c_crossattn"]
        real = int(c.get("num_tokens", cross.shape[1]))
        mask = c.get("attention_mask")
        if mask is None:
            mask = (torch.arange(cross.shape[1], device=cross.device) < real).long().unsqueeze(0)
        pad = length - cross.shape[1]
        out[key] = {**c, "c_crossattn": torch.nn.functional.pad(cross, (0, 0, 0, pad)),
                    "attention_mask": torch.nn.functional.pad(mask, (0, pad)), "num_tokens": length}
    return out
