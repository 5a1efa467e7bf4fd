"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

The one sequence every writer of the package uses: write a hidden temporary sibling, fsync it, rename it over
the target (os.replace, atomic on POSIX and Windows), fsync the folder so the rename itself survives a power
cut. `replacing(path)` gives the temporary path to writers that only take a path (safetensors, PIL, matplotlib);
`write_bytes_atomic` / `write_text_atomic` do it for data in memory. A failed write removes its temporary file,
so a full disk leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call (the pid lets cleaners spot dead writers)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; on leaving, it is fsynced and renamed over `path`, and the
    folder is fsynced. On an exception the temporary file is removed and `path` is left as it was."""
    target = Path(path)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically: a fsynced temporary sibling, rename, fsync of the folder."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written sibling behind
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically (see write_bytes_atomic)."""
    write_bytes_atomic(path, text.encode("utf-8"))
