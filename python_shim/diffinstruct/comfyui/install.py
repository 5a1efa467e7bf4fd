"""ComfyUI integration for an installed wheel: a loader file in custom_nodes/ that registers the nodes.

    diffinstruct comfyui install --comfyui /path/to/ComfyUI      (or python -m diffinstruct.comfyui install ...)
    diffinstruct comfyui uninstall --comfyui /path/to/ComfyUI

ComfyUI only discovers node packs in its custom_nodes folders (not pip packages), so `install` writes the
folder custom_nodes/diffinstruct_loader/: an __init__.py that imports the node classes from this package, and
workflows/, a copy of the shipped templates (ComfyUI lists and serves a pack's templates from its own folder).
The loader imports this package (diffinstruct.comfyui), which the clone route imports too.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import InstallError

LOADER_NAME = "diffinstruct_loader"  # a folder: ComfyUI serves templates only from a pack folder's workflows/
MARKER = "# written by: python -m diffinstruct.comfyui install"
CLONE_MARKER = "diffinstruct node pack entry point"  # in the repository root's __init__.py
LOADER = f'''"""Registers the diffinstruct (Diff-Instruct++) nodes from the installed Python package."""
{MARKER}
import logging
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _clone(name):  # a clone of the repository beside this loader wins: it is checked before diffinstruct is imported
    init = os.path.join(_ROOT, name, "__init__.py")
    if name.endswith(".disabled") or os.path.join(_ROOT, name) == _HERE or not os.path.isfile(init):
        return False
    with open(init, encoding="utf-8", errors="replace") as f:
        return "{CLONE_MARKER}" in f.read()


_CLONES = [os.path.join(_ROOT, n) for n in sorted(os.listdir(_ROOT)) if _clone(n)]
if _CLONES:
    logging.getLogger("diffinstruct").warning(
        "diffinstruct is installed twice: the clone %s and the wheel's loader %s; the clone's nodes are used. "
        "Remove one (python -m diffinstruct.comfyui uninstall --comfyui ...)", _CLONES[0], _HERE)
    NODE_CLASS_MAPPINGS = {{}}
else:
    from diffinstruct.comfyui import loader_exports

    globals().update(loader_exports(__file__))
'''


def pack_folder() -> Path:
    """The folder holding the pack's web/ and workflows/: this package's."""
    return Path(__file__).resolve().parent


def loader_exports(init_file: str) -> dict[str, object]:
    """What the wheel's loader (custom_nodes/diffinstruct_loader/__init__.py) exports to ComfyUI: the node
    classes, the web extension (an absolute WEB_DIRECTORY: ComfyUI joins it to the pack folder) and, refreshed here
    so that an upgraded wheel brings its templates along, the loader's copy of the workflows."""
    here = Path(init_file).resolve().parent
    sync_workflows(pack_folder() / "workflows", here / "workflows")
    web = pack_folder() / "web"
    from . import registry

    return {**registry.exports(), "WEB_DIRECTORY": str(web) if web.is_dir() else None}


def sync_workflows(source: Path, target: Path) -> list[Path]:
    """Copy the shipped templates (workflows/*.json and their *.jpg thumbnails) into `target`, rewriting only the
    files that differ (each atomically) and removing stale ones; returns the files written."""
    if not source.is_dir():
        return []
    wanted = {p.name: p for p in sorted(source.iterdir()) if p.suffix in (".json", ".jpg") and p.is_file()}
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, src in wanted.items():
        dst = target / name
        data = src.read_bytes()
        if not dst.is_file() or dst.read_bytes() != data:
            write_bytes_atomic(dst, data)
            written.append(dst)
    for stale in target.iterdir():
        if stale.is_file() and stale.suffix in (".json", ".jpg") and stale.name not in wanted:
            stale.unlink()
    return written


def custom_nodes_dir(comfyui: str | os.PathLike[str]) -> Path:
    root = Path(comfyui).expanduser()
    if not root.is_dir():
        raise InstallError(f"{root} is not a folder; pass the ComfyUI folder (the one holding main.py and "
                           "custom_nodes/)")
    if root.name == "custom_nodes":
        return root
    if not (root / "main.py").is_file() and not (root / "custom_nodes").is_dir():
        raise InstallError(f"{root} does not look like ComfyUI (no main.py and no custom_nodes/)")
    return root / "custom_nodes"


def _ours(init: Path) -> bool:
    return init.is_file() and MARKER in init.read_text(encoding="utf-8", errors="replace")


def install(comfyui: str | os.PathLike[str]) -> Path:
    """Write the loader folder into ComfyUI's custom_nodes/ (its __init__.py and the templates, each atomically);
    returns the folder. A loader file of an older version of this installer is replaced."""
    folder = custom_nodes_dir(comfyui)
    folder.mkdir(exist_ok=True)
    target = folder / LOADER_NAME
    init = target / "__init__.py"
    if target.exists() and not _ours(init):
        raise InstallError(f"{target} exists and was not written by this installer; remove it first")
    old = folder / f"{LOADER_NAME}.py"
    if old.exists() and not _ours(old):
        raise InstallError(f"{old} exists and was not written by this installer; remove it first")
    target.mkdir(exist_ok=True)
    write_text_atomic(init, LOADER)
    sync_workflows(pack_folder() / "workflows", target / "workflows")
    old.unlink(missing_ok=True)
    return target


def uninstall(comfyui: str | os.PathLike[str]) -> Path | None:
    target = custom_nodes_dir(comfyui) / LOADER_NAME
    if not target.exists():
        return None
    if not _ours(target / "__init__.py"):
        raise InstallError(f"{target} was not written by this installer; not removing it")
    shutil.rmtree(target)
    return target


def command(args: argparse.Namespace) -> int:
    """`diffinstruct comfyui install | uninstall --comfyui DIR`, or `train` (an exported run: cluster.py; arguments
    parsed by cli.py). A folder that is
    not ComfyUI's raises InstallError (bad input, exit status 2); failing to write there is an OSError (1)."""
    if args.action == "train":
        from .cluster import command as train
        from .registry import DEFINITIONS

        return train(args, DEFINITIONS)
    if args.action == "install":
        path = install(args.comfyui)
        print(f"wrote {path}; restart ComfyUI to load the Diff-Instruct++ nodes")
    else:
        removed = uninstall(args.comfyui)
        print(f"removed {removed}" if removed else "nothing to remove")
    return 0
