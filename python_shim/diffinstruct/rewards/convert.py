"""Loading state dicts safely, and converting legacy pickled checkpoints to safetensors.

    diffinstruct convert IN.pth OUT.safetensors [--key state_dict]     (or python -m diffinstruct.rewards.convert)

Pickles are read with `torch.load(weights_only=True)`: plain tensors and containers load, arbitrary code does not
run. A checkpoint that needs more than that is refused with the error torch gives.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _unwrap(obj: Any, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"key {key!r} not in the checkpoint (top level: {top})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError("checkpoint holds no tensors")
    return out


def load_state_dict(path: str | os.PathLike[str], key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled checkpoint read with weights_only=True (on the CPU)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    if p.suffix in PICKLE_SUFFIXES:
        return _unwrap(torch.load(str(p), map_location="cpu", weights_only=True), key)
    raise ValueError(f"unknown weight file type {p.suffix!r} for {p} "
                     f"(expected .safetensors or one of {PICKLE_SUFFIXES})")


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], key: str | None = None) -> int:
    """Writes the tensors of `src` to the safetensors file `dst`; returns the number of tensors."""
    from safetensors.torch import save_file

    tensors = load_state_dict(src, key)
    # safetensors refuses shared storage and non-contiguous tensors: give every tensor its own copy
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"converted_from": Path(src).name})
    return len(tensors)


def command(args: argparse.Namespace) -> int:
    """`diffinstruct convert SRC DST [--key KEY]` (arguments parsed by cli.py)."""
    n = convert(args.src, args.dst, args.key)
    print(f"wrote {n} tensors to {args.dst}")
    return 0


if __name__ == "__main__":  # `python -m diffinstruct.rewards.convert ...` is `diffinstruct convert ...`
    from diffinstruct.cli import main

    raise SystemExit(main(["convert", *sys.argv[1:]]))
