"""ComfyUI entry point of the diffinstruct node pack (clone this repository into ComfyUI's custom_nodes/).

This file is the diffinstruct node pack entry point (the wheel's loader looks for that phrase: a clone beside it
wins, docs/COMFYUI.md section 1). It only re-exports the package's ComfyUI side, diffinstruct.comfyui, which the
wheel's loader imports too. The clone runs its own copy of the package, so python_shim/ goes first on sys.path
unless diffinstruct is already imported.
"""

from __future__ import annotations

import os
import sys

_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_shim")
if "diffinstruct" not in sys.modules and os.path.isdir(_SHIM) and _SHIM not in sys.path:
    sys.path.insert(0, _SHIM)

from diffinstruct.comfyui.registry import exports  # noqa: E402 - after the path above

WEB_DIRECTORY = "./python_shim/diffinstruct/comfyui/web"  # the canvas extension: results and live status
globals().update(exports())  # inside ComfyUI: comfy_entrypoint (V3); outside: the declarations

__all__ = ["WEB_DIRECTORY"]
