"""ComfyUI entry point of the diffinstruct node pack (clone this repository into ComfyUI's custom_nodes/).

The package lives in python_shim/; when it is not installed (no `pip install`), that folder is put on
sys.path so the nodes find it. ComfyUI imports this file as a package under its own path-derived name,
so the relative import below never collides with ComfyUI's top-level `nodes` module.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_shim")
if importlib.util.find_spec("diffinstruct") is None and os.path.isdir(_SHIM):
    sys.path.insert(0, _SHIM)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain top-level module: a tool walking the checkout (pytest run from the root of a
    # folder whose name is not an identifier, e.g. ComfyUI-DiffInstruct) rather than ComfyUI, which always
    # loads this file as a package. There is no package to hold the nodes then, so nothing is registered.
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
