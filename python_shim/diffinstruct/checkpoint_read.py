"""Finding and loading checkpoints: which checkpoint of a run folder is usable, and restoring one exactly.

The write side, and the layout these read, are in checkpoint.py (which re-exports every public name here);
meta.json's schema is checkpoint_schema.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint_schema import (
    _STEP_DIR,
    LATEST,
    META,
    ROLES,
    TENSOR_FILES,
    json_value,
    read_checkpoint_meta,
    sha256_file,
)
from .errors import CheckpointDamaged, CheckpointDamagedWarning, CheckpointError, NoUsableCheckpoint

if TYPE_CHECKING:
    from .trainer import DITrainer


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------- finding
def check_checkpoint(path: str | os.PathLike[str], verify: bool = False) -> dict[str, Any]:
    """The validated meta.json of a complete checkpoint; CheckpointDamaged naming the file at fault otherwise.

    Every file must exist with the size meta.json records; verify=True also compares their SHA-256.
    """
    ckpt = Path(path)
    meta = read_checkpoint_meta(ckpt)
    for fname, info in meta["files"].items():
        fpath = ckpt / fname
        if not fpath.is_file():
            raise CheckpointDamaged(fpath, "missing (the checkpoint is incomplete)")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise CheckpointDamaged(fpath, f"has {size} bytes, {META} records {info['bytes']} (cut short or "
                                           "overwritten)")
        if verify and sha256_file(fpath) != info["sha256"]:
            raise CheckpointDamaged(fpath, f"corrupt: its SHA-256 differs from the one {META} records")
    return meta


def incomplete_reason(path: str | os.PathLike[str], verify: bool = False) -> str | None:
    """None when `path` is a complete checkpoint; otherwise why not, naming the file at fault."""
    try:
        check_checkpoint(path, verify)
    except CheckpointDamaged as exc:
        return str(exc)
    return None


def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every step-NNNNNN directory of a run directory, complete or not, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for entry in run.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m is not None and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run directory, oldest first (hidden temporary directories are ignored)."""
    return [(step, path) for step, path in checkpoint_dirs(run_dir) if incomplete_reason(path) is None]


def read_latest(run: Path) -> str | None:
    try:
        name = (run / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return name if _STEP_DIR.match(name) else None


def latest_checkpoint(run_dir: str | os.PathLike[str], verify: bool = False) -> Path | None:
    """The checkpoint `latest` names if usable, else the newest usable one; None when there is no checkpoint.

    Usable: check_checkpoint passes (verify=True: hashes included). Each damaged checkpoint looked at on the
    way is skipped with a CheckpointDamagedWarning naming the file and the reason. When step directories exist
    but none is usable, NoUsableCheckpoint says so: continuing from step 0 there would silently drop the run.
    """
    run = Path(run_dir)
    dirs = checkpoint_dirs(run)
    pointed = read_latest(run)
    if pointed is not None and (run / pointed).exists():
        # `latest` first: after a death between rename and pointer update it names the older, proven one
        order = [run / pointed, *(p for _, p in reversed(dirs) if p.name != pointed)]
    else:
        if pointed is not None:
            warnings.warn(f"{run / LATEST} names {pointed}, which does not exist; using the newest usable "
                          "checkpoint", CheckpointDamagedWarning, stacklevel=2)
        order = [p for _, p in reversed(dirs)]
    damaged: list[CheckpointDamaged] = []
    for path in order:
        try:
            check_checkpoint(path, verify)
        except CheckpointDamaged as exc:
            damaged.append(exc)
            warnings.warn(f"skipping damaged checkpoint {path.name}: {exc}", CheckpointDamagedWarning,
                          stacklevel=2)
            continue
        return path
    if damaged:
        raise NoUsableCheckpoint(
            f"{run} holds no usable checkpoint: all {len(damaged)} are damaged ("
            + "; ".join(str(exc) for exc in damaged)
            + "). Nothing was resumed; repair or move those step-NNNNNN folders away to start the run over")
    return None


def _resolve(path: str | os.PathLike[str], verify: bool) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / META).exists() or _STEP_DIR.match(p.name):
        return p, check_checkpoint(p, verify)
    found = latest_checkpoint(p, verify)
    if found is None:
        raise CheckpointError(f"{p} holds no complete checkpoint (no step-NNNNNN directory with {META} "
                              f"and all of {', '.join(TENSOR_FILES.values())})")
    return found, check_checkpoint(found)  # already checked (hashes too, if asked): this only reads its meta


def find_checkpoint(path: str | os.PathLike[str], verify: bool = False) -> Path:
    """Resolve a checkpoint directory, or a run directory to its latest usable checkpoint (latest_checkpoint)."""
    return _resolve(path, verify)[0]


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return read_checkpoint_meta(find_checkpoint(path))


# ---------------------------------------------------------------------------------------------- loading
def _load_file(ckpt: Path, role: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    fpath = ckpt / TENSOR_FILES[role]
    if not fpath.is_file():  # removed since it was checked
        raise CheckpointDamaged(fpath, "missing (the checkpoint is incomplete)")
    try:
        return load_file(fpath)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointDamaged(fpath, f"not readable as safetensors ({exc})") from exc


def _check_shapes(what: str, tensors: dict[str, torch.Tensor], params: Sequence[torch.Tensor],
                  names: Sequence[str] | None = None) -> None:
    expected = {str(i) for i in range(len(params))}
    if set(tensors) != expected:
        raise CheckpointError(f"{what}: the checkpoint holds {len(tensors)} tensors, the model has {len(params)} "
                              "trainable parameters (a different model or LoRA configuration?)")
    for i, p in enumerate(params):
        t = tensors[str(i)]
        if tuple(t.shape) != tuple(p.shape):
            label = f" ({names[i]})" if names and i < len(names) else ""
            raise CheckpointError(f"{what}: parameter {i}{label} has shape {list(t.shape)} in the checkpoint "
                                  f"but {list(p.shape)} in the model")


def _param_labels(meta: dict[str, Any], role: str) -> list[str]:
    return [entry.get("name", "?") for entry in meta.get("params", {}).get(role, [])]


@torch.no_grad()
def load_params(path: str | os.PathLike[str], role: str, params: Sequence[torch.Tensor],
                verify: bool = True) -> CheckpointInfo:
    """Copy one role's tensors ("generator", "ta" or "ema") of a checkpoint into `params` (e.g. EMA -> generator)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    ckpt, meta = _resolve(path, verify)
    tensors = _load_file(ckpt, role)
    labels = _param_labels(meta, "ta" if role == "ta" else "generator")
    _check_shapes(f"{ckpt / TENSOR_FILES[role]}", tensors, params, labels)
    for i, p in enumerate(params):
        p.copy_(tensors[str(i)])
    return CheckpointInfo(ckpt, int(meta["step"]), meta)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if json_value(saved.get(k)) != json_value(current.get(k))]


@torch.no_grad()
def load_checkpoint(trainer: DITrainer, path: str | os.PathLike[str], verify: bool = True) -> CheckpointInfo:
    """Restore everything save_checkpoint wrote into `trainer`; `path` is a checkpoint or a run directory.

    Shapes are checked before anything is modified; optimiser hyper-parameters come from the checkpoint
    (as torch's load_state_dict does), and a warning lists config keys that differ from the trainer's.
    """
    ckpt, meta = _resolve(path, verify)
    models = trainer.models
    loaded = {role: _load_file(ckpt, role) for role in TENSOR_FILES}
    _check_shapes(f"{ckpt / TENSOR_FILES['generator']}", loaded["generator"], models.generator_params,
                  _param_labels(meta, "generator"))
    _check_shapes(f"{ckpt / TENSOR_FILES['ta']}", loaded["ta"], models.ta_params, _param_labels(meta, "ta"))
    _check_shapes(f"{ckpt / TENSOR_FILES['ema']}", loaded["ema"], trainer.ema.shadow,
                  _param_labels(meta, "generator"))
    opt_state: dict[str, dict[int, dict[str, torch.Tensor]]] = {"generator": {}, "ta": {}}
    for key, tensor in loaded["optimizer"].items():
        prefix, index, name = (key.split(".", 2) + ["", ""])[:3]
        if prefix not in opt_state or not index.isdigit() or not name:
            raise CheckpointDamaged(ckpt / TENSOR_FILES["optimizer"], f"holds an unexpected tensor {key!r}")
        opt_state[prefix].setdefault(int(index), {})[name] = tensor
    for prefix, params in (("generator", models.generator_params), ("ta", models.ta_params)):
        for index, state in opt_state[prefix].items():
            if index >= len(params):
                raise CheckpointError(f"{ckpt / TENSOR_FILES['optimizer']}: {prefix} optimiser state for parameter "
                                      f"{index}, but the model has {len(params)}")
            for name, t in state.items():
                if t.dim() > 0 and tuple(t.shape) != tuple(params[index].shape):
                    raise CheckpointError(f"{ckpt / TENSOR_FILES['optimizer']}: {prefix}.{index}.{name} has shape "
                                          f"{list(t.shape)}, the parameter {list(params[index].shape)}")
    saved_cfg = meta.get("config", {})
    diffs = config_differences({k: v for k, v in saved_cfg.items() if k != "extra"},
                               {k: v for k, v in trainer.cfg.to_dict().items() if k != "extra"})
    if diffs:
        warnings.warn(f"the trainer's config differs from checkpoint {ckpt.name}'s: {'; '.join(diffs)}",
                      stacklevel=2)

    # everything checked: now modify
    for role, params in (("generator", models.generator_params), ("ta", models.ta_params)):
        for i, p in enumerate(params):
            p.copy_(loaded[role][str(i)])
    for i, s in enumerate(trainer.ema.shadow):
        s.copy_(loaded["ema"][str(i)])
    for prefix, opt, params in (("generator", trainer.opt_generator, models.generator_params),
                                ("ta", trainer.opt_ta, models.ta_params)):
        opt_meta = meta["optimizers"][prefix]
        opt.state.clear()
        scalars = opt_meta.get("state_scalars", {})
        for i, p in enumerate(params):
            state: dict[str, Any] = {}
            for name, t in opt_state[prefix].get(i, {}).items():
                # `step` stays on the CPU (torch's non-capturable convention); moments follow the parameter
                state[name] = t.clone() if name == "step" else t.to(p.device, copy=True)
            for key, value in scalars.items():
                idx, name = key.split(".", 1)
                if int(idx) == i:
                    state[name] = value
            if state:
                opt.state[p] = state
        for group, saved in zip(opt.param_groups, opt_meta["param_groups"], strict=True):
            for k, v in saved.items():
                group[k] = tuple(v) if isinstance(v, list) else v
    counters = meta.get("counters", {})
    trainer.bad_in_a_row = int(counters.get("bad_in_a_row", 0))
    trainer.skipped_steps = int(counters.get("skipped_steps", 0))
    return CheckpointInfo(ckpt, int(meta["step"]), meta)
