"""ComfyUI entry point of the diffinstruct node pack (clone this repository into ComfyUI's custom_nodes/).

This file is the diffinstruct node pack entry point (the wheel's loader looks for that phrase: a clone beside it
wins, docs/COMFYUI.md section 1). The package lives in python_shim/; the clone runs its own copy of it, so that
folder goes first on sys.path unless diffinstruct is already imported. ComfyUI imports this file as a package
under its own path-derived name, so the relative import below never collides with ComfyUI's top-level `nodes`.
"""

from __future__ import annotations

import os
import sys

_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_shim")
if "diffinstruct" not in sys.modules and os.path.isdir(_SHIM) and _SHIM not in sys.path:
    sys.path.insert(0, _SHIM)

WEB_DIRECTORY = "./nodes/web"  # the canvas extension: results and the live status on the nodes

if __package__:
    from . import nodes as _nodes

    globals().update(_nodes.exports())  # inside ComfyUI: comfy_entrypoint (V3); outside: the declarations
else:
    # Imported as a plain top-level module: a tool walking the checkout (pytest run from the root of a
    # folder whose name is not an identifier, e.g. ComfyUI-DiffInstruct) rather than ComfyUI, which always
    # loads this file as a package. There is no package to hold the nodes then, so nothing is registered.
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["WEB_DIRECTORY"]
