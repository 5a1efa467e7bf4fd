"""A trained generator back from a checkpoint: its run config, then the problem built with the saved weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .builders import build
from .parse import load_config, parse_config
from .problems import Built
from .spec import RunSpec

WEIGHTS = ("ema", "generator")


def spec_for_checkpoint(path: str | Path, config: str | Path | None = None) -> tuple[Path, RunSpec, dict[str, Any]]:
    """(checkpoint folder, its RunSpec, its meta.json) for a step-NNNNNN folder or a run folder (its latest).

    The run config comes from `config` (a TOML file) when given, else from the one `train` stored in the
    checkpoint; a checkpoint without one (not written by `train`) is refused with a ConfigError saying so."""
    from .. import checkpoint

    ckpt = checkpoint.find_checkpoint(path)
    meta = checkpoint.read_meta(ckpt)
    if config is not None:
        return ckpt, load_config(config), meta
    run_config = meta.get("metadata", {}).get("run_config")
    if not isinstance(run_config, dict):
        raise ConfigError(f"{ckpt / checkpoint.META} records no run config (it was not written by "
                          "`python -m diffinstruct train`); pass --config with the run's TOML file")
    try:
        spec = parse_config(run_config, source=str(ckpt / checkpoint.META))
    except ConfigError as exc:
        raise ConfigError(f"the run config stored in {ckpt / checkpoint.META} is not valid here: {exc}") from None
    return ckpt, spec, meta


def load_weights(path: str | Path, config: str | Path | None = None,
                 weights: str = "ema") -> tuple[Path, RunSpec, dict[str, Any], Built]:
    """(checkpoint, RunSpec, meta, Built) with the checkpoint's `weights` ("ema" or "generator") loaded into the
    built problem's generator, ready for Problem.sample / evaluate / generate_images."""
    from .. import checkpoint

    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    ckpt, spec, meta = spec_for_checkpoint(path, config)
    built = build(spec)
    checkpoint.load_params(ckpt, weights, built.models.generator_params)
    return ckpt, spec, meta, built
