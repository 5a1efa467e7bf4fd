"""The vocabulary of the op table: how each C entry point's arguments are declared.

A declaration lists what the binding checks, in the order it checks it, because the first failing
check decides the message: scalars are all parsed, then all range-checked, then the op's
cross-argument rules run, then the tensors are taken one by one, and last every tensor must sit
on one device without an output overlapping another argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FLOAT = ("float32", "float16", "bfloat16")
F32 = ("float32",)
I64 = ("int64",)

IN, OUT, INOUT = "in", "out", "inout"


@dataclass(frozen=True)
class Scalar:
    name: str
    parse: Callable[[Any, str], Any]  # object -> the value the kernel uses; raises naming `name`
    check: Callable[[str, Any], None] | None = None  # range check of the parsed value


@dataclass(frozen=True)
class Tensor:
    """One tensor argument. shape is what the binding requires of it:
    - "any": nothing beyond a non-empty, contiguous tensor;
    - "lead": the first tensor, whose shape and dtype the "like" ones repeat;
    - "batch": the lead, with at least one dimension (its first is the batch);
    - "vector": the lead, one-dimensional (its length is the batch);
    - "like": the lead's shape and dtype;
    - "sample": shape (batch,), one value per sample of the lead;
    - "table": a non-empty, finite, non-negative, strictly ascending 1-D sigma table.
    values="sigma": every element finite and > 0."""

    name: str
    role: str = IN
    dtypes: tuple[str, ...] = FLOAT
    shape: str = "any"
    optional: bool = False
    values: str = ""


@dataclass(frozen=True)
class TensorList:
    """A list (or tuple) of tensors; the lists of one call pair up item by item, and each item has
    the shape of its partner in the first list."""

    name: str
    role: str = IN
    dtypes: tuple[str, ...] = FLOAT
    optional: bool = False


Arg = Tensor | TensorList


@dataclass(frozen=True)
class Op:
    """One kernel: its C entry, its reference, and the binding's checks of its arguments.

    params: the entry's positional arguments, in order (the public API passes them by these
    names); the tensors, lists and scalars below are the subset the binding checks, each in the
    order it checks them. reference(values) fills the outputs in `values` (parsed scalars, torch
    tensors) from the pure-PyTorch reference; None where there is none (host-side computations)."""

    name: str
    params: tuple[str, ...]
    scalars: tuple[Scalar, ...] = ()
    tensors: tuple[Arg, ...] = ()
    rules: Callable[[dict[str, Any]], None] | None = None
    reference: Callable[[dict[str, Any]], None] | None = None
    cuda: bool = True  # the CUDA library has it (False: it runs on the CPU whatever the inputs)
    streamed: bool = True  # the entry takes stream= (the device ops)
    lead: str = field(init=False)
    converters: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        roles = {a.name: ("list-" if isinstance(a, TensorList) else "") + ("in" if a.role == IN else "out")
                 for a in self.tensors}
        object.__setattr__(self, "lead", self.tensors[0].name if self.tensors else "")
        object.__setattr__(self, "converters", tuple((p, roles.get(p, "")) for p in self.params))
