"""The value checks every layer repeats: integers and numbers that are not booleans.

`True` is an `int` in Python, and JSON/TOML `true` arrives as one, so a bare `isinstance(x, int)` lets
`steps = true` through as 1; every count and number goes through these instead. No torch import.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def is_int(value: Any) -> bool:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float, not a boolean (may be inf or nan)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def check_int(name: str, value: Any, low: int, error: type[Exception] = ConfigError, hint: str = "") -> int:
    """`value` if it is an integer >= low, else `error` naming `name` (with `hint` after the bound)."""
    if not is_int(value) or value < low:
        raise error(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    return value


def check_finite(name: str, value: Any, error: type[Exception] = ConfigError) -> int | float:
    """`value` if it is a finite int or float, else `error` naming `name`."""
    if not is_finite_number(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    return value
