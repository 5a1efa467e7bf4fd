"""Where a diffusers model's files are: the folder layouts, file names and config reading every loader shares."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

Kind = Literal["unet", "pixart", "sd3"]
KINDS: tuple[str, ...] = ("unet", "pixart", "sd3")

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
SUBFOLDERS: dict[str, str] = {"unet": "unet", "pixart": "transformer", "sd3": "transformer"}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "pixart": ("PixArtTransformer2DModel", "Transformer2DModel"),
    "sd3": ("SD3Transformer2DModel",),
}

PathLike = str | os.PathLike


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the diffusers host needs the `diffusers` package: pip install diffusers") from exc
    return diffusers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _weight_names(variant: str | None) -> list[str]:
    if not variant:
        return list(WEIGHT_NAMES)
    out = []
    for name in WEIGHT_NAMES:
        stem, _, rest = name.partition(".")
        out.append(f"{stem}.{variant}.{rest}")
    return out + list(WEIGHT_NAMES)


def _layout(what: str, sub: str) -> str:
    return (f"a diffusers {what} folder ({CONFIG_NAME} + {WEIGHT_NAMES[0]}), a pipeline folder ({MODEL_INDEX_NAME} "
            f"+ {sub}/), or a .safetensors file with its {CONFIG_NAME}")


def _config_for_file(file: Path, config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if config is not None:
        c = Path(config).expanduser()
        if c.is_dir():
            c = c / CONFIG_NAME
        if not c.is_file():
            raise FileNotFoundError(f"config for {file} not found: expected {c}")
        return _read_json(c)
    candidates = [file.with_suffix(".json"), file.parent / CONFIG_NAME]
    for c in candidates:
        if c.is_file():
            return _read_json(c)
    raise FileNotFoundError(f"single-file model {file} needs its diffusers config: expected "
                            f"{' or '.join(str(c) for c in candidates)} (or pass config=)")


def _pretrained_kwargs(dtype: torch.dtype | None, variant: str | None) -> dict[str, Any]:
    """from_pretrained options: local files only; without accelerate diffusers would warn and fall back to
    low_cpu_mem_usage=False anyway."""
    kwargs: dict[str, Any] = {"local_files_only": True,
                              "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if variant:
        kwargs["variant"] = variant
    return kwargs
