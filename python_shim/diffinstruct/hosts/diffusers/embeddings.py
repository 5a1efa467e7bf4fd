"""Prompt-embeddings files: {prompt: conditioning dict} in one .safetensors file, the "diffusers" problem's
[diffusers] embeddings (this host has no text encoder at training time)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .conditioning import _cond_dict
from .layout import PathLike


def save_prompt_embeddings(path: PathLike, conditioning: Mapping[str, Any]) -> None:
    """Write {prompt: cond dict (batch 1)} to a .safetensors file that the "diffusers" problem reads.

    Tensors are stacked per key over prompts; the prompt list goes to the metadata. Include the null
    prompt "" (its conditioning is the unconditional one for CFG).
    """
    from safetensors.torch import save_file

    prompts = list(conditioning)
    if not prompts:
        raise ValueError("no prompts to save")
    flat = [_flatten(_cond_dict(conditioning[p])) for p in prompts]
    keys = sorted(flat[0])
    for p, f in zip(prompts, flat, strict=True):
        if sorted(f) != keys:
            raise ValueError(f"prompt {p!r} has conditioning keys {sorted(f)}, the first prompt {keys}")
    tensors = {k: torch.cat([f[k].detach().cpu() for f in flat], dim=0).contiguous() for k in keys}
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts)})


def _flatten(cond: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in cond.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != 1:
                raise ValueError(f"conditioning {prefix}{k} must have batch 1, got shape {tuple(v.shape)}")
            out[f"{prefix}{k}"] = v
        else:
            raise TypeError(f"conditioning {prefix}{k} must be a tensor, got {type(v).__name__}")
    return out


def load_prompt_embeddings(path: PathLike) -> dict[str, dict[str, Any]]:
    """{prompt: cond dict with batch 1} from a file written by save_prompt_embeddings."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt embeddings file {p} does not exist (write it with "
                                "diffinstruct.hosts.diffusers.save_prompt_embeddings)")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "prompts" not in meta:
        raise ValueError(f"{p} has no 'prompts' metadata; write it with save_prompt_embeddings")
    prompts = json.loads(meta["prompts"])
    out: dict[str, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        cond: dict[str, Any] = {}
        for key, t in tensors.items():
            if t.shape[0] != len(prompts):
                raise ValueError(f"{p}: tensor {key} has {t.shape[0]} rows for {len(prompts)} prompts")
            node = cond
            *heads, leaf = key.split(".")
            for h in heads:
                node = node.setdefault(h, {})
            node[leaf] = t[i : i + 1].clone()
        out[prompt] = cond
    return out
