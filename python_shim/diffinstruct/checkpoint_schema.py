"""The meta.json schema of a checkpoint, and the errors a checkpoint that is missing or damaged raises.

validate_meta checks what save_checkpoint (checkpoint.py) writes: every key present, with its type and range,
``step`` equal to the folder's step, and the four tensor files listed with their sizes and SHA-256. A fault is a
CheckpointDamaged naming the file and the first field at fault; checkpoint.py re-exports every name here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .checks import is_finite_number, is_int
from .config import METHODS
from .errors import CheckpointDamaged

FORMAT = "diffinstruct-checkpoint"
FORMAT_VERSION = 1
META = "meta.json"
TENSOR_FILES = {"generator": "generator.safetensors", "ta": "ta.safetensors", "ema": "ema.safetensors",
                "optimizer": "optimizer.safetensors"}
LATEST = "latest"  # the pointer file naming the newest checkpoint of a run folder
ROLES = ("generator", "ta", "ema")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class _Invalid(Exception):
    """A schema violation inside meta.json; validate_meta turns it into CheckpointDamaged naming the file."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCALAR_KEY = re.compile(r"^(\d+)\.(.+)$")
_OPTIMIZED = ("generator", "ta")


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _Invalid(f"{where}{key} is missing")
    return obj[key]


def _object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = _field(obj, key, where)
    if not isinstance(value, dict):
        raise _Invalid(f"{where}{key} must be a JSON object, got {value!r}")
    return value


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = _field(obj, key, where)
    if not isinstance(value, list):
        raise _Invalid(f"{where}{key} must be a list, got {value!r}")
    return value


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise _Invalid(f"{where}{key} must be a string, got {value!r}")
    return value


_is_int = is_int  # JSON true is no count


def _integer(obj: dict[str, Any], key: str, where: str, low: int) -> int:
    value = _field(obj, key, where)
    if not _is_int(value) or value < low:
        raise _Invalid(f"{where}{key} must be an integer >= {low}, got {value!r}")
    return int(value)


_is_number = is_finite_number


def _in_range(value: float, low: float | None, high: float | None, open_low: bool, open_high: bool) -> bool:
    if low is not None and (value <= low if open_low else value < low):
        return False
    return high is None or (value < high if open_high else value <= high)


def _range_text(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if open_high else '<='} {high:g}")
    return f" {' and '.join(parts)}" if parts else ""


def _number(obj: dict[str, Any], key: str, where: str, low: float | None = None, high: float | None = None,
            open_low: bool = False, open_high: bool = False) -> float:
    value = _field(obj, key, where)
    if not _is_number(value) or not _in_range(float(value), low, high, open_low, open_high):
        raise _Invalid(f"{where}{key} must be a finite number{_range_text(low, high, open_low, open_high)}, "
                       f"got {value!r}")
    return float(value)


def _param_group(group: Any, where: str) -> None:
    if not isinstance(group, dict):
        raise _Invalid(f"{where} must be a JSON object, got {group!r}")
    where += "."
    _number(group, "lr", where, low=0.0)
    betas = _field(group, "betas", where)
    if (not isinstance(betas, list) or len(betas) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise _Invalid(f"{where}betas must be a list of two numbers in [0, 1), got {betas!r}")
    _number(group, "eps", where, low=0.0, open_low=True)
    _number(group, "weight_decay", where, low=0.0)
    if not isinstance(_field(group, "decoupled", where), bool):
        raise _Invalid(f"{where}decoupled must be true or false, got {group['decoupled']!r}")
    if "params" in group:  # the loader would put this list in place of the optimiser's parameters
        raise _Invalid(f"{where}params must not be stored (the parameters come from the model)")
    for key, value in group.items():  # keys of other optimiser options: copied onto the group as they are
        if not (value is None or isinstance(value, bool | str) or _is_number(value)
                or (isinstance(value, list) and all(_is_number(v) for v in value))):
            raise _Invalid(f"{where}{key} must be a number, a string, true/false, null or a list of numbers, "
                           f"got {value!r}")


def _optimizer(opt: dict[str, Any], where: str, n_params: int) -> None:
    groups = _list(opt, "param_groups", where)
    if len(groups) != 1:  # save_checkpoint writes exactly one group per optimiser
        raise _Invalid(f"{where}param_groups must hold exactly one group, got {len(groups)}")
    _param_group(groups[0], f"{where}param_groups[0]")
    for key, value in _object(opt, "state_scalars", where).items():
        m = _SCALAR_KEY.match(key)
        if m is None or int(m.group(1)) >= n_params:
            raise _Invalid(f"{where}state_scalars has key {key!r}; keys are <parameter index>.<name> with an index "
                           f"below {n_params}")
        if not (isinstance(value, bool) or _is_number(value)):
            raise _Invalid(f"{where}state_scalars.{key} must be a finite number or true/false, got {value!r}")


def _params(entries: list[Any], where: str) -> None:
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise _Invalid(f"{at} must be a JSON object, got {entry!r}")
        _string(entry, "name", at + ".")
        _string(entry, "dtype", at + ".")
        shape = _field(entry, "shape", at + ".")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Invalid(f"{at}.shape must be a list of integers >= 0, got {shape!r}")


def _check_schema(meta: Any, ckpt: Path) -> None:
    if not isinstance(meta, dict):
        raise _Invalid(f"must hold a JSON object, got {type(meta).__name__} {meta!r:.60}")
    if meta.get("format") != FORMAT:
        raise _Invalid(f"format must be {FORMAT!r}, got {meta.get('format')!r} (not a {FORMAT} file?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _Invalid(f"format_version is {meta.get('format_version')!r}; this version of diffinstruct reads "
                       f"{FORMAT_VERSION}")
    step = _integer(meta, "step", "", 0)
    m = _STEP_DIR.match(ckpt.name)
    if m is not None and int(m.group(1)) != step:  # resuming would run from a step the folder does not hold
        raise _Invalid(f"step is {step}, but the folder is {ckpt.name} (step {int(m.group(1))})")
    if _field(meta, "steps", "") is not None:
        _integer(meta, "steps", "", 1)
    if _string(meta, "method", "") not in METHODS:
        raise _Invalid(f"method must be one of {', '.join(METHODS)}, got {meta['method']!r}")
    _number(meta, "alpha", "", low=0.0)
    _number(meta, "omega", "", low=0.0)
    _integer(meta, "seed", "", 0)
    _string(meta, "base_model", "")
    _string(meta, "created", "")
    _object(meta, "metadata", "")
    config = _object(meta, "config", "")
    for key in ("method", "alpha", "omega", "seed"):  # the top-level copies are what `eval` reports
        if key in config and config[key] != meta[key]:
            raise _Invalid(f"{key} is {meta[key]!r} but config.{key} is {config[key]!r}")
    counters = _object(meta, "counters", "")
    _integer(counters, "bad_in_a_row", "counters.", 0)
    _integer(counters, "skipped_steps", "counters.", 0)
    params = _object(meta, "params", "")
    optimizers = _object(meta, "optimizers", "")
    for role in _OPTIMIZED:
        entries = _list(params, role, "params.")
        _params(entries, f"params.{role}")
        _optimizer(_object(optimizers, role, "optimizers."), f"optimizers.{role}.", len(entries))
    for key, value in _object(meta, "versions", "").items():
        if not isinstance(value, str):
            raise _Invalid(f"versions.{key} must be a string, got {value!r}")
    files = _object(meta, "files", "")
    for role, fname in TENSOR_FILES.items():
        if fname not in files:
            raise _Invalid(f"files does not list {fname} (the {role} tensors)")
    extra = sorted(set(files) - set(TENSOR_FILES.values()))
    if extra:  # names are joined to the folder, so only the four known ones may appear
        raise _Invalid(f"files lists {', '.join(map(repr, extra))}; a checkpoint holds only "
                       f"{', '.join(TENSOR_FILES.values())}")
    for fname, info in files.items():
        where = f"files[{fname!r}]"
        if not isinstance(info, dict):
            raise _Invalid(f"{where} must be a JSON object, got {info!r}")
        _integer(info, "bytes", where + ".", 0)
        if not isinstance(info.get("sha256"), str) or _SHA256.match(info["sha256"]) is None:
            raise _Invalid(f"{where}.sha256 must be 64 lower-case hex digits, got {info.get('sha256')!r}")


def validate_meta(meta: Any, ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """`meta` (meta.json's parsed content of checkpoint folder `ckpt`) if it follows the schema.

    The schema is what save_checkpoint writes: every key present, with its type and range, step equal to the
    folder's step, and the four tensor files listed with their sizes and SHA-256. Anything else raises
    CheckpointDamaged naming meta.json and the first field at fault.
    """
    path = Path(ckpt)
    try:
        _check_schema(meta, path)
    except _Invalid as exc:
        raise CheckpointDamaged(path / META, str(exc)) from None
    return meta


def read_checkpoint_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of checkpoint folder `ckpt`, read and validated (validate_meta); CheckpointDamaged if not."""
    path = Path(ckpt)
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointDamaged(path, "not a directory")
    if not meta_path.is_file():
        raise CheckpointDamaged(meta_path, "missing (the checkpoint is incomplete)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise CheckpointDamaged(meta_path, f"not readable as JSON ({exc})") from None
    return validate_meta(meta, path)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_value(value: Any) -> Any:
    """`value` as JSON stores it (NaN as null, paths as strings, anything else as its repr)."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)
