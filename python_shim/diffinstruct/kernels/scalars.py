"""Scalar arguments as the C binding reads them (python_shim/tensor_arg.c), with its exact messages.

The C entry points check their own arguments; these twins let the reference backend refuse the
same calls with the same words, so an error never depends on where a kernel ran. Each parser
returns the value the kernel would use; each range check takes the parsed value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)
FLT_TRUE_MIN = float(np.finfo(np.float32).smallest_subnormal)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes defined in Python, whose tp_name is their bare name
INT64_MAX = 2**63 - 1


def tp_name(t: type) -> str:
    """The C-level name of a type (Py_TYPE(obj)->tp_name), which the binding's messages print."""
    if t.__flags__ & _HEAPTYPE or t.__module__ == "builtins":
        return t.__name__
    return f"{t.__module__}.{t.__name__}"


def fmt_g(value: float) -> str:
    """C's %g, which glibc prints as -nan for a NaN with its sign bit set."""
    if math.isnan(value) and math.copysign(1.0, value) < 0:
        return "-nan"
    return f"{value:g}"


def _is_bool(obj: Any) -> bool:
    # a flag where a number belongs is a mistake, not 0 or 1 (bool is an int subclass)
    return isinstance(obj, (bool, np.bool_))


def arg_double(obj: Any, name: str) -> float:
    if isinstance(obj, float):
        return float.__float__(obj)
    t = type(obj)
    if _is_bool(obj) or isinstance(obj, (complex, np.complexfloating)) or not (
            hasattr(t, "__float__") or hasattr(t, "__index__")):
        raise TypeError(f"{name} must be a real number, got {tp_name(t)}")
    try:
        return float(obj)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int too large for a float") from None
    except Exception:  # the object's own __float__ failed: the binding names the argument instead
        raise TypeError(f"{name} must be a real number, got {tp_name(t)}") from None


def _index(obj: Any, name: str, expected: str) -> int:
    if not _is_bool(obj):
        try:
            return operator.index(obj)
        except Exception:  # replaced by the message that names the argument, as the binding does
            pass
    raise TypeError(f"{name} must be {expected}, got {tp_name(type(obj))}")


def _int_text(value: int) -> str:
    """How an out-of-range int reads in the binding's messages (never the digits of a huge int)."""
    if value > INT64_MAX:
        return "an int >= 2**63"
    if value < -INT64_MAX - 1:
        return "an int < -2**63"
    return str(value)


def arg_u64(obj: Any, name: str) -> int:
    value = _index(obj, name, "an int")
    if 0 <= value < 2**64:
        return value
    text = "an int >= 2**64" if value > INT64_MAX else _int_text(value)
    raise ValueError(f"{name} must be in [0, 2**64), got {text}")


def arg_i64(lo: int, hi: int = INT64_MAX) -> Callable[[Any, str], int]:
    def parse(obj: Any, name: str) -> int:
        value = _index(obj, name, "an int")
        if lo <= value <= hi:
            return value
        text, overflow = _int_text(value), not -INT64_MAX - 1 <= value <= INT64_MAX
        if hi == INT64_MAX and not overflow:
            raise ValueError(f"{name} must be >= {lo}, got {text}")
        if hi == INT64_MAX:
            raise ValueError(f"{name} must be in [{lo}, 2**63), got {text}")
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {text}")

    return parse


def arg_bool(obj: Any, name: str) -> bool:
    if obj is True or obj is False or isinstance(obj, np.bool_):
        return bool(obj)
    if not isinstance(obj, (int, np.integer)):
        raise TypeError(f"{name} must be a bool, got {tp_name(type(obj))}")
    value = _index(obj, name, "a bool")
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False (or 0 or 1), got {_int_text(value)}")


def arg_choice(*choices: str) -> Callable[[Any, str], str]:
    allowed = ", ".join(choices)

    def parse(obj: Any, name: str) -> str:
        if not isinstance(obj, str):
            raise TypeError(f"{name} must be a str (one of {allowed}), got {tp_name(type(obj))}")
        for choice in choices:
            if str.__eq__(obj, choice):  # the whole str: an embedded NUL or a lone surrogate never matches
                return choice
        raise ValueError(f"{name} must be one of {allowed}, got {obj!r}")

    return parse


# Range checks of values the kernels take as float32 (the second pass, after every scalar parsed).


def f32_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {fmt_g(value)}")
    if abs(value) > FLT_MAX:
        raise ValueError(f"{name} must be at most {FLT_MAX:.8g} in magnitude (the float32 range), got {fmt_g(value)}")


def f32_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {fmt_g(value)}")
    if value > FLT_MAX or float(np.float32(value)) == 0.0:
        raise ValueError(f"{name} must be representable in float32 (> 0 after conversion: about "
                         f"{FLT_TRUE_MIN:.2g} to {FLT_MAX:.8g}), got {fmt_g(value)}")


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str, float], None]:
    def check(name: str, value: float) -> None:
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (
            value < hi if hi_open else value <= hi)
        if not ok:
            raise ValueError(f"{name} must be in {'(' if lo_open else '['}{fmt_g(lo)}, {fmt_g(hi)}"
                             f"{')' if hi_open else ']'}, got {fmt_g(value)}")

    return check


def shape_text(shape: Sequence[int]) -> str:
    """A shape as the binding prints it: (2, 3), (5,) or ()."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
