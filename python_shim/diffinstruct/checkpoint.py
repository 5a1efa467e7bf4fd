"""Checkpoints of a DITrainer: safetensors + meta.json per directory, written atomically, resumed exactly.

Layout of a run directory::

    run_dir/
      step-000120/            one complete checkpoint (the state after 120 completed steps)
        generator.safetensors trainable generator tensors, keyed by their index in models.generator_params
        ta.safetensors        trainable TA tensors, keyed by index in models.ta_params
        ema.safetensors       the generator's EMA shadow, same keys as generator.safetensors
        optimizer.safetensors both FusedAdam states: "generator.<i>.<name>", "ta.<i>.<name>"
        meta.json             written last: step, config, counters, optimiser scalars, versions, file sizes/hashes
      latest                  one line naming the newest checkpoint directory

A checkpoint is written into a hidden sibling ``.tmp-step-...`` directory, every file and the directory
are fsync'ed, then the directory is renamed into place and ``latest`` is replaced (write + os.replace).
A writer killed at any point therefore leaves the previous checkpoints and ``latest`` intact; a hidden
temporary directory is never picked up and is removed by the next save.

``step`` is the number of completed training steps: resuming from ``step-000120`` runs step 120 next.
All random draws are stateless (rng.stream_seed), so no RNG state is stored.

Checkpoints damaged afterwards (by hand, or by a disk) never load silently from the wrong place: meta.json
is validated against one schema (validate_meta: every key, its type and range, ``step`` equal to the folder's
step, the tensor files with sizes and SHA-256), and the files against it (check_checkpoint). Any fault is a
CheckpointDamaged naming the file and the reason. latest_checkpoint, which resuming uses, skips such a
checkpoint with a CheckpointDamagedWarning and takes the next newest; when every one is damaged it raises
NoUsableCheckpoint rather than letting the run start again from step 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .atomic import fsync_dir as _fsync_dir
from .atomic import fsync_file as _fsync_file
from .atomic import write_bytes_atomic as write_bytes_atomic
from .atomic import write_text_atomic as write_text_atomic
from .checkpoint_schema import (
    _STEP_DIR,
    FORMAT,
    FORMAT_VERSION,
    META,
    TENSOR_FILES,
    read_checkpoint_meta,
)
from .checkpoint_schema import validate_meta as validate_meta
from .checks import check_int
from .errors import CheckpointDamaged, CheckpointDamagedWarning, CheckpointError, NoUsableCheckpoint

if TYPE_CHECKING:
    from .trainer import DITrainer

LATEST = "latest"
ROLES = ("generator", "ta", "ema")
_STALE = re.compile(r"^\.(?:tmp-.+|trash-.+|latest\.tmp)-(\d+)-[0-9a-f]{8}$")

# Test hook: called as hook(stage, path) at "file" (after each file is written and synced), "renamed" (the
# directory is in place, `latest` not yet updated) and "latest" (pointer updated). Production code never sets it.
_save_hook: Callable[[str, Path], None] | None = None


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hook(stage: str, path: Path) -> None:
    if _save_hook is not None:
        _save_hook(stage, path)


def _remove_tree(path: Path) -> None:
    """Rename out of the way first, so a removal cut short never leaves a step-* directory behind."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours, or no permission to ask
        return True
    return True


def _clean_stale(run_dir: Path) -> None:
    """Remove temporary/trash directories and pointer files left by writers that no longer run."""
    for entry in run_dir.iterdir():
        m = _STALE.match(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


# ---------------------------------------------------------------------------------------------- state
def _param_names(params: Sequence[torch.nn.Parameter], modules: Sequence[torch.nn.Module]) -> list[str]:
    names: dict[int, str] = {}
    for module in modules:
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
    return [names.get(id(p), f"param_{i}") for i, p in enumerate(params)]


def _tensors(params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(i): p.detach().to("cpu").contiguous() for i, p in enumerate(params)}


def _optimizer_state(opt: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], prefix: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{i}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{i}.{key}"] = value
    groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if len(opt.param_groups) != 1 or len(opt.param_groups[0]["params"]) != len(params):
        raise CheckpointError(f"the {prefix} optimiser must hold exactly the trainable parameters in one group")
    return tensors, {"param_groups": groups, "state_scalars": _jsonable(scalars)}


def _versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {"diffinstruct": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _meta(trainer: DITrainer, step: int, total_steps: int | None, base_model: str, metadata: dict[str, Any] | None,
          files: dict[str, dict[str, Any]], optimizers: dict[str, Any], names: dict[str, list[str]]) -> dict[str, Any]:
    """meta.json of a checkpoint (the schema validate_meta checks)."""
    models, cfg = trainer.models, trainer.cfg
    params = {"generator": models.generator_params, "ta": models.ta_params}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "steps": total_steps,
        "method": cfg.method,
        "alpha": cfg.alpha,
        "omega": cfg.omega,
        "seed": cfg.seed,
        "base_model": base_model,
        "config": _jsonable(cfg.to_dict()),
        "counters": {"bad_in_a_row": trainer.bad_in_a_row, "skipped_steps": trainer.skipped_steps},
        "optimizers": optimizers,
        "params": {role: [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                          for n, p in zip(names[role], params[role], strict=True)] for role in ("generator", "ta")},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metadata": _jsonable(metadata or {}),
        "files": files,
    }


def save_checkpoint(trainer: DITrainer, run_dir: str | os.PathLike[str], step: int, *, keep: int = 3,
                    metadata: dict[str, Any] | None = None, base_model: str = "",
                    total_steps: int | None = None) -> Path:
    """Write the full training state after `step` completed steps; returns the checkpoint directory.

    keep: how many newest checkpoints to keep (0 keeps all); the one `latest` names is never removed.
    """
    from safetensors.torch import save_file

    check_int("step", step, 0, ValueError)
    check_int("keep", keep, 0, ValueError, hint=" (0 keeps every checkpoint)")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    _clean_stale(run)
    name = step_dir_name(step)
    final = run / name
    tmp = run / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        models = trainer.models
        modules = [models.generator, models.ta, *models.modules]
        gen_names = _param_names(models.generator_params, modules)
        ta_names = _param_names(models.ta_params, modules)
        opt_g, opt_g_meta = _optimizer_state(trainer.opt_generator, models.generator_params, "generator")
        opt_t, opt_t_meta = _optimizer_state(trainer.opt_ta, models.ta_params, "ta")
        contents = {
            "generator": _tensors(models.generator_params),
            "ta": _tensors(models.ta_params),
            "ema": _tensors(trainer.ema.shadow),
            "optimizer": {**opt_g, **opt_t},
        }
        files: dict[str, dict[str, Any]] = {}
        for role, tensors in contents.items():
            path = tmp / TENSOR_FILES[role]
            save_file(tensors, path, metadata={"format": FORMAT, "content": role, "step": str(step)})
            _fsync_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            _hook("file", path)
        meta = _meta(trainer, step, total_steps, base_model, metadata, files,
                     {"generator": opt_g_meta, "ta": opt_t_meta}, {"generator": gen_names, "ta": ta_names})
        meta_path = tmp / META
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _hook("file", meta_path)
        _fsync_dir(tmp)
        if final.exists():  # a leftover of an earlier attempt at this step (e.g. written but never pointed to)
            _remove_tree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run)
    _hook("renamed", final)
    write_text_atomic(run / LATEST, name + "\n")
    _hook("latest", run / LATEST)
    if keep:
        prune(run, keep)
    return final


def prune(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Remove all but the `keep` newest complete checkpoints (never the one `latest` names); returns the removed."""
    run = Path(run_dir)
    pointed = _read_latest(run)
    complete = list_checkpoints(run)
    removed = []
    for _, path in complete[:-keep] if keep else []:
        if pointed is not None and path.name == pointed:
            continue
        _remove_tree(path)
        removed.append(path)
    return removed


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


def _read_latest(run: Path) -> str | None:
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
    pointed = _read_latest(run)
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
            if _jsonable(saved.get(k)) != _jsonable(current.get(k))]


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
