"""Noise schedules of diffusers models as the engine's sigma tables, from a scheduler config (a dict, a diffusers
scheduler, or a local scheduler_config.json)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ... import kernels
from .layout import SCHEDULER_CONFIG_NAME, PathLike, _read_json

PREDICTIONS = {"epsilon": "eps", "eps": "eps", "v_prediction": "v", "v": "v"}


def _scheduler_dict(scheduler: Any) -> dict[str, Any]:
    """A scheduler config from None, a dict, a diffusers scheduler (its .config) or a local path."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    if isinstance(scheduler, str | os.PathLike):
        return load_scheduler_config(scheduler)
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"scheduler must be a path, a dict or a diffusers scheduler, got {type(scheduler).__name__}")


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """diffusers' rescale_betas_zero_snr on alpha-bar (Lin et al. 2023, algorithm 1)."""
    s = np.sqrt(alphas_cumprod)
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * s0 / (s0 - s_last)
    return s**2


def sigmas_from_scheduler_config(config: Mapping[str, Any]) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) by DDPM timestep t, ascending, from a scheduler config.

    "scaled_linear" goes through kernels.sigma_table (the engine's own table); "linear",
    "squaredcos_cap_v2" and trained_betas are computed here. With rescale_betas_zero_snr the last
    abar is set to 2^-24, as diffusers does, so the table stays finite.
    """
    n = int(config.get("num_train_timesteps", 1000))
    schedule = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    trained = config.get("trained_betas")
    if trained is None and schedule == "scaled_linear" and not zero_snr:
        return np.asarray(kernels.sigma_table("scaled_linear", n, beta_start=start, beta_end=end), dtype=np.float64)
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(math.sqrt(start), math.sqrt(end), n, dtype=np.float64) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; use linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas")
    abar = np.cumprod(1.0 - betas)
    if zero_snr:
        abar = _rescale_zero_terminal_snr(abar)
        abar[-1] = 2.0**-24
    return np.sqrt((1.0 - abar) / abar)


def prediction_type(config: Mapping[str, Any], default: str = "eps") -> Literal["eps", "v"]:
    """'eps' or 'v' from a scheduler config's prediction_type (default when absent)."""
    value = config.get("prediction_type", default)
    if value not in PREDICTIONS:
        raise ValueError(f"prediction_type {value!r} is not supported; use epsilon or v_prediction")
    return PREDICTIONS[value]  # type: ignore[return-value]


def find_scheduler_config(path: PathLike) -> Path | None:
    """scheduler_config.json for a model path: the file itself, <folder>/, <folder>/scheduler/, <parent>/scheduler/."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.name == SCHEDULER_CONFIG_NAME:
            return p
        p = p.parent
    for c in (p / SCHEDULER_CONFIG_NAME, p / "scheduler" / SCHEDULER_CONFIG_NAME,
              p.parent / "scheduler" / SCHEDULER_CONFIG_NAME):
        if c.is_file():
            return c
    return None


def load_scheduler_config(path: PathLike) -> dict[str, Any]:
    """A scheduler config (dict) from scheduler_config.json, a scheduler/ folder or a pipeline folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return _read_json(p)
    if not p.exists():
        raise FileNotFoundError(f"scheduler config {p} does not exist (expected a {SCHEDULER_CONFIG_NAME} file, "
                                f"a scheduler folder, or a pipeline folder)")
    for c in (p / SCHEDULER_CONFIG_NAME, p / "scheduler" / SCHEDULER_CONFIG_NAME):
        if c.is_file():
            return _read_json(c)
    raise FileNotFoundError(f"{p} has no {SCHEDULER_CONFIG_NAME} (expected {p / SCHEDULER_CONFIG_NAME} or "
                            f"{p / 'scheduler' / SCHEDULER_CONFIG_NAME})")
