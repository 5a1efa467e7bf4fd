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

This module writes; finding and loading are in checkpoint_read.py and meta.json's schema in checkpoint_schema.py,
and every public name of both is re-exported here (``checkpoint.load_checkpoint`` etc.).

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
import json
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .atomic import fsync_dir as _fsync_dir
from .atomic import fsync_file as _fsync_file
from .atomic import write_bytes_atomic as write_bytes_atomic
from .atomic import write_text_atomic as write_text_atomic
from .checkpoint_read import CheckpointInfo as CheckpointInfo
from .checkpoint_read import check_checkpoint as check_checkpoint
from .checkpoint_read import checkpoint_dirs as checkpoint_dirs
from .checkpoint_read import config_differences as config_differences
from .checkpoint_read import find_checkpoint as find_checkpoint
from .checkpoint_read import incomplete_reason as incomplete_reason
from .checkpoint_read import latest_checkpoint as latest_checkpoint
from .checkpoint_read import list_checkpoints as list_checkpoints
from .checkpoint_read import load_checkpoint as load_checkpoint
from .checkpoint_read import load_params as load_params
from .checkpoint_read import read_latest
from .checkpoint_read import read_meta as read_meta
from .checkpoint_schema import FORMAT, FORMAT_VERSION, META, TENSOR_FILES, json_value, sha256_file
from .checkpoint_schema import LATEST as LATEST
from .checkpoint_schema import ROLES as ROLES
from .checkpoint_schema import read_checkpoint_meta as read_checkpoint_meta
from .checkpoint_schema import validate_meta as validate_meta
from .checks import check_int
from .errors import CheckpointDamaged as CheckpointDamaged
from .errors import CheckpointDamagedWarning as CheckpointDamagedWarning
from .errors import CheckpointError
from .errors import NoUsableCheckpoint as NoUsableCheckpoint

if TYPE_CHECKING:
    from .trainer import DITrainer

_STALE = re.compile(r"^\.(?:tmp-.+|trash-.+|latest\.tmp)-(\d+)-[0-9a-f]{8}$")

# Test hook: called as hook(stage, path) at "file" (after each file is written and synced), "renamed" (the
# directory is in place, `latest` not yet updated) and "latest" (pointer updated). Production code never sets it.
_save_hook: Callable[[str, Path], None] | None = None


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


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
    groups = [{k: json_value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if len(opt.param_groups) != 1 or len(opt.param_groups[0]["params"]) != len(params):
        raise CheckpointError(f"the {prefix} optimiser must hold exactly the trainable parameters in one group")
    return tensors, {"param_groups": groups, "state_scalars": json_value(scalars)}


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
        "config": json_value(cfg.to_dict()),
        "counters": {"bad_in_a_row": trainer.bad_in_a_row, "skipped_steps": trainer.skipped_steps},
        "optimizers": optimizers,
        "params": {role: [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                          for n, p in zip(names[role], params[role], strict=True)] for role in ("generator", "ta")},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metadata": json_value(metadata or {}),
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
    pointed = read_latest(run)
    complete = list_checkpoints(run)
    removed = []
    for _, path in complete[:-keep] if keep else []:
        if pointed is not None and path.name == pointed:
            continue
        _remove_tree(path)
        removed.append(path)
    return removed
