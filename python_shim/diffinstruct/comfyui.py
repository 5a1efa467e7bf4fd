"""ComfyUI integration for an installed wheel: a loader file in custom_nodes/ that registers the nodes.

    diffinstruct comfyui install --comfyui /path/to/ComfyUI      (or python -m diffinstruct.comfyui install ...)
    diffinstruct comfyui uninstall --comfyui /path/to/ComfyUI

ComfyUI only discovers node packs in its custom_nodes folders (not pip packages), so `install` writes
custom_nodes/diffinstruct_loader.py (atomically), which imports the node classes from this package.
The nodes ship in the wheel as `diffinstruct.comfy_nodes`; in a source checkout they are the repository's
nodes/ folder, found next to python_shim/.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .atomic import write_text_atomic
from .errors import InstallError

LOADER_NAME = "diffinstruct_loader.py"
MARKER = "# written by: python -m diffinstruct.comfyui install"
LOADER = f'''"""Registers the diffinstruct (Diff-Instruct++) nodes from the installed Python package."""
{MARKER}
from diffinstruct.comfyui import load_nodes

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = load_nodes()
'''
_SOURCE_MODULE = "diffinstruct_comfy_nodes"


def nodes_module() -> ModuleType:
    """The node pack's module: the packaged copy, else the source checkout's nodes/ folder."""
    if importlib.util.find_spec("diffinstruct.comfy_nodes") is not None:
        return importlib.import_module("diffinstruct.comfy_nodes")
    if _SOURCE_MODULE in sys.modules:
        return sys.modules[_SOURCE_MODULE]
    folder = Path(__file__).resolve().parents[2] / "nodes"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ImportError(f"the diffinstruct node classes were not found: neither the package "
                          f"diffinstruct.comfy_nodes nor {init} exists (reinstall the wheel)")
    spec = importlib.util.spec_from_file_location(_SOURCE_MODULE, init, submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_SOURCE_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_SOURCE_MODULE]
        raise
    return module


def load_nodes() -> tuple[dict[str, type], dict[str, str]]:
    module = nodes_module()
    return dict(module.NODE_CLASS_MAPPINGS), dict(module.NODE_DISPLAY_NAME_MAPPINGS)


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


def install(comfyui: str | os.PathLike[str]) -> Path:
    """Write the loader into ComfyUI's custom_nodes/ (temporary file + rename); returns its path."""
    folder = custom_nodes_dir(comfyui)
    folder.mkdir(exist_ok=True)
    target = folder / LOADER_NAME
    if target.exists() and MARKER not in target.read_text(encoding="utf-8", errors="replace"):
        raise InstallError(f"{target} exists and was not written by this installer; remove it first")
    write_text_atomic(target, LOADER)
    return target


def uninstall(comfyui: str | os.PathLike[str]) -> Path | None:
    target = custom_nodes_dir(comfyui) / LOADER_NAME
    if not target.exists():
        return None
    if MARKER not in target.read_text(encoding="utf-8", errors="replace"):
        raise InstallError(f"{target} was not written by this installer; not removing it")
    target.unlink()
    return target


def command(args: argparse.Namespace) -> int:
    """`diffinstruct comfyui install | uninstall --comfyui DIR` (arguments parsed by cli.py). A folder that is
    not ComfyUI's raises InstallError (bad input, exit status 2); failing to write there is an OSError (1)."""
    if args.action == "install":
        path = install(args.comfyui)
        print(f"wrote {path}; restart ComfyUI to load the Diff-Instruct++ nodes")
    else:
        removed = uninstall(args.comfyui)
        print(f"removed {removed}" if removed else "nothing to remove")
    return 0


if __name__ == "__main__":  # `python -m diffinstruct.comfyui ...` is `diffinstruct comfyui ...`
    from diffinstruct.cli import main

    raise SystemExit(main(["comfyui", *sys.argv[1:]]))
