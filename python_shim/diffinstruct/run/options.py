"""The option schema of a run's TOML file: one `Option` per key, and `check_section` that validates a table.

Every error is a ConfigError naming the section and key ("[toy2d] hidden must be an integer, got 1.5 (float)"),
so a bad file is refused before any work starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..checks import is_int, is_number
from ..errors import ConfigError

REQUIRED: Any = object()
KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
              "floats": "a list of numbers", "table": "a table", "any": "a value"}


@dataclass(frozen=True)
class Option:
    """One key of a config section: its kind, default (REQUIRED when none), range or choices, and help."""

    kind: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] | None = None
    length: int | None = None
    nullable: bool = False
    help: str = ""


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    return repr(value)


def _check_number(where: str, value: Any, opt: Option, bad: str) -> int | float:
    if opt.kind == "int":
        if not is_int(value):
            raise ConfigError(bad)
    else:
        if not is_number(value):
            raise ConfigError(bad)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    if opt.low is not None and (value <= opt.low if opt.open_low else value < opt.low):
        raise ConfigError(f"{where} = {value!r} must be {'>' if opt.open_low else '>='} {opt.low:g}")
    if opt.high is not None and value > opt.high:
        raise ConfigError(f"{where} = {value!r} must be <= {opt.high:g}")
    return value


def _check_floats(where: str, value: Any, opt: Option, bad: str) -> list[float]:
    if not isinstance(value, list) or not all(is_number(v) for v in value):
        raise ConfigError(bad)
    if opt.length is not None and len(value) != opt.length:
        raise ConfigError(f"{where} must have {opt.length} numbers, got {len(value)}")
    if not all(math.isfinite(v) for v in value):
        raise ConfigError(f"{where} must hold finite numbers, got {value!r}")
    return [float(v) for v in value]


def _check_value(where: str, value: Any, opt: Option) -> Any:
    """`value` converted to the option's kind, or ConfigError naming `where` (e.g. "[toy2d] hidden")."""
    if value is None and (opt.nullable or opt.default is None):
        return None
    if opt.kind == "any":
        return value
    bad = f"{where} must be {KIND_NAMES[opt.kind]}, got {_toml_repr(value)} ({_toml_type(value)})"
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(bad)
        return value
    if opt.kind == "str":
        if not isinstance(value, str):
            raise ConfigError(bad)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{where} = {_toml_repr(value)} is not valid; choose one of {', '.join(opt.choices)}")
        return value
    if opt.kind == "table":
        if not isinstance(value, dict):
            raise ConfigError(bad)
        return value
    if opt.kind == "floats":
        return _check_floats(where, value, opt, bad)
    if opt.kind in ("int", "float"):
        return _check_number(where, value, opt, bad)
    raise ValueError(f"unknown option kind {opt.kind!r}")  # pragma: no cover - programming error in an option table


def check_section(name: str, table: Any, options: dict[str, Option]) -> dict[str, Any]:
    """Validate one TOML table against its options: unknown keys, kinds, ranges, required keys; fills defaults."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table (a [{name}] section), got {_toml_type(table)}")
    unknown = sorted(set(table) - set(options))
    if unknown:
        raise ConfigError(f"[{name}] unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(options)}")
    out = {}
    for key, opt in options.items():
        if key not in table:
            if opt.default is REQUIRED:
                hint = f" ({opt.help})" if opt.help else ""
                raise ConfigError(f"[{name}] {key} is required{hint}")
            out[key] = opt.default
        else:
            out[key] = _check_value(f"[{name}] {key}", table[key], opt)
    return out
