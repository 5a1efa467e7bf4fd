"""diffusers models from local files only: a model folder, a pipeline folder or one .safetensors file (+ its
config.json); random-weight models from a config for tests; and `load_denoiser`, the model as a Denoiser."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import DENOISERS
from .layout import (
    CLASS_NAMES,
    CONFIG_NAME,
    KINDS,
    MODEL_INDEX_NAME,
    SUBFOLDERS,
    PathLike,
    _config_for_file,
    _diffusers,
    _layout,
    _pretrained_kwargs,
    _read_json,
    _weight_names,
)
from .schedules import find_scheduler_config, load_scheduler_config


def resolve_model_path(path: PathLike, kind: str, variant: str | None = None) -> tuple[Path, Path | None]:
    """(model folder, None) or (single weights file, None): raises FileNotFoundError naming what is missing."""
    if kind not in SUBFOLDERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    sub = SUBFOLDERS[kind]
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected {_layout(kind, sub)}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: a single-file model must be a .safetensors file in diffusers layout")
        return p, p
    folder = p
    if not (folder / CONFIG_NAME).is_file():
        if (p / sub).is_dir():
            folder = p / sub
        elif (p / MODEL_INDEX_NAME).is_file():
            raise FileNotFoundError(f"pipeline folder {p} has no {sub}/ subfolder (expected {p / sub})")
        else:
            raise FileNotFoundError(f"{p} has no {CONFIG_NAME} (expected {p / CONFIG_NAME}) and no {sub}/ "
                                    f"subfolder; expected {_layout(kind, sub)}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"model folder {folder} has no {CONFIG_NAME} (expected {folder / CONFIG_NAME})")
    names = _weight_names(variant)
    if not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(f"model folder {folder} has no weights: expected {folder / names[0]} "
                                f"(or one of {', '.join(names[1:])})")
    return folder, None


def _check_class(config: Mapping[str, Any], kind: str, where: Path) -> None:
    name = config.get("_class_name")
    if name is not None and name not in CLASS_NAMES[kind]:
        raise ValueError(f"{where} holds a {name}, not a {' / '.join(CLASS_NAMES[kind])} (kind {kind!r})")


def _model_class(kind: str) -> Any:
    d = _diffusers()
    return {"unet": d.UNet2DConditionModel, "pixart": d.PixArtTransformer2DModel,
            "sd3": d.SD3Transformer2DModel}[kind]


def load_model(path: PathLike, kind: str, *, config: Any = None, dtype: torch.dtype | None = None,
               variant: str | None = None) -> nn.Module:
    """A diffusers model of `kind` ("unet" | "pixart" | "sd3") from local files only, in eval mode."""
    cls = _model_class(kind)
    folder, file = resolve_model_path(path, kind, variant)
    if file is None:
        _check_class(_read_json(folder / CONFIG_NAME), kind, folder / CONFIG_NAME)
        model = cls.from_pretrained(str(folder), **_pretrained_kwargs(dtype, variant))
    else:
        from safetensors.torch import load_file

        cfg = _config_for_file(file, config)
        _check_class(cfg, kind, file)
        state = load_file(str(file))
        if any(k.startswith("model.diffusion_model.") for k in state):
            raise ValueError(f"{file} is in the original (LDM/SAI) layout, not diffusers layout; convert it to a "
                             "diffusers folder first (e.g. with diffusers' conversion scripts on a machine that "
                             "has the model's configs)")
        model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{file} does not match its config: {len(missing)} missing key(s) "
                             f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
        if dtype is not None:
            nn.Module.to(model, dtype)
    return model.eval()


def load_unet(path: PathLike, **kwargs: Any) -> nn.Module:
    """UNet2DConditionModel from a local unet folder, pipeline folder or .safetensors file (+ config)."""
    return load_model(path, "unet", **kwargs)


def load_pixart_transformer(path: PathLike, **kwargs: Any) -> nn.Module:
    """PixArt-alpha transformer (PixArtTransformer2DModel; legacy Transformer2DModel configs are remapped)."""
    return load_model(path, "pixart", **kwargs)


def load_sd3_transformer(path: PathLike, **kwargs: Any) -> nn.Module:
    """SD3Transformer2DModel from local files."""
    return load_model(path, "sd3", **kwargs)


def detect_kind(path: PathLike, config: Any = None) -> str:
    """"unet", "pixart" or "sd3" from the model's config.json _class_name (or the pipeline's layout)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected a local diffusers model or pipeline folder")
    if p.is_file():
        cfg = _config_for_file(p, config)
    else:
        candidates = [p / CONFIG_NAME, p / "unet" / CONFIG_NAME, p / "transformer" / CONFIG_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"cannot tell the model kind of {p}: expected one of "
                                    f"{', '.join(str(c) for c in candidates)}")
        cfg = _read_json(found)
    name = cfg.get("_class_name")
    for kind, names in CLASS_NAMES.items():
        if name in names:
            return kind
    raise ValueError(f"{p}: model class {name!r} is not supported; supported: "
                     f"{', '.join(n for names in CLASS_NAMES.values() for n in names)}")


def load_denoiser(path: PathLike, kind: str = "auto", *, config: Any = None, scheduler: Any = None,
                  dtype: torch.dtype | None = None, variant: str | None = None) -> nn.Module:
    """A Denoiser from a local diffusers pipeline/model folder or file; the scheduler config is found beside it.

    scheduler: None looks for scheduler_config.json next to the model (defaults apply when there is
    none: SD1.5's scaled_linear eps for a UNet); a path must exist.
    """
    resolved = detect_kind(path, config) if kind == "auto" else kind
    if resolved not in KINDS:
        raise ValueError(f"kind must be auto or one of {', '.join(KINDS)}, got {kind!r}")
    model = load_model(path, resolved, config=config, dtype=dtype, variant=variant)
    if scheduler is None:
        found = find_scheduler_config(path)
        scheduler = load_scheduler_config(found) if found is not None else None
    return DENOISERS[resolved](model, scheduler)


def build_model(kind: str, config: Mapping[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A diffusers model of `kind` with random weights from a config dict (no file, no download).

    Built directly in `dtype` (no float32 copy on the way), so peak memory is that of the model.
    """
    cls = _model_class(kind)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        model = cls.from_config(dict(config))
    finally:
        torch.set_default_dtype(previous)
    nn.Module.to(model, dtype)  # buffers made outside the default dtype (diffusers' .to() only adds a warning)
    return model.eval()
