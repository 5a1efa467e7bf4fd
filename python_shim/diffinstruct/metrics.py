"""Per-step metrics as JSON lines, made to match an uninterrupted run after a resume.

One line per record: {"step": int, <metric>: float | null, ...}; non-finite values are written as null
(JSON has no NaN). Fields whose name starts with "time_" are wall-clock timings and the only ones that
differ between an interrupted-and-resumed run and an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from .atomic import write_text_atomic

TIMING_PREFIX = "time_"


def jsonable(value: Any) -> Any:
    if isinstance(value, bool):  # before the number cases: True is an int
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    try:
        return jsonable(float(value))  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)


def encode(record: dict[str, Any]) -> str:
    """One JSON line; `step` is written as an integer."""
    out = {k: jsonable(v) for k, v in record.items()}
    if "step" in out and out["step"] is not None:
        out["step"] = int(out["step"])
    return json.dumps(out, allow_nan=False, separators=(",", ":"))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records; a last line cut short (a writer killed mid-line) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    records = []
    for line in p.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_from(path: str | os.PathLike[str], step: int, inclusive: bool = True) -> int:
    """Keep only complete records with step < `step` (<= when not inclusive); atomic rewrite. Returns lines kept."""
    p = Path(path)
    if not p.exists():
        return 0
    keep = []
    for line in p.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(s, int | float) and (s < step if inclusive else s <= step):
            keep.append(line)
    write_text_atomic(p, "".join(keep))
    return len(keep)


class JsonlWriter:
    """Appends one record per line and flushes each line (a killed run loses at most the line in flight)."""

    def __init__(self, path: str | os.PathLike[str], fresh: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(encode(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_log(path: str | os.PathLike[str], resume_step: int, inclusive: bool = True) -> JsonlWriter:
    """A writer for a run starting at `resume_step`: fresh file at 0, else earlier records kept, later dropped."""
    if resume_step <= 0:
        return JsonlWriter(path, fresh=True)
    truncate_from(path, resume_step, inclusive=inclusive)
    return JsonlWriter(path)


def without_timing(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with the wall-clock fields removed (what must match between resumed and uninterrupted runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIX)} for r in records]


def write_curves(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str],
                 title: str = "") -> Path | None:
    """Loss / reward curves of a metrics.jsonl as a PNG (matplotlib, Agg); None when there is nothing to plot."""
    from .plotting import plot_curves

    return plot_curves(read_jsonl(metrics_path), png_path, title=title)
