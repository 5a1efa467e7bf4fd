"""Which ComfyUI the node pack runs in, and whether it provides the V3 node API the pack is pinned to.

The pack's nodes are V3 nodes of `comfy_api.v0_0_2` (a versioned, frozen copy of the V3 API: io.ComfyNode,
io.Schema, io.Custom, io.Hidden, ComfyExtension). It first shipped after ComfyUI 0.3.47; the pack is tested on
0.3.64 and states that as its minimum (README, pyproject's [tool.comfy] requires-comfyui). An older ComfyUI gets
one clear error naming both versions instead of a failing import deep inside the pack (docs/COMFYUI.md section 1).
Nothing here imports ComfyUI unless it is already running.
"""

from __future__ import annotations

import importlib
import re
import sys

API_MODULE = "comfy_api.v0_0_2"
MIN_COMFYUI = (0, 3, 64)
API_NAMES = ("ComfyNode", "Schema", "Custom", "Hidden", "NodeOutput")


def inside_comfyui() -> bool:
    """ComfyUI imports its folder_paths before it loads any node pack; tools and tests without it do not."""
    return "folder_paths" in sys.modules


def version_of_host() -> str | None:
    module = sys.modules.get("comfyui_version")
    if module is None:
        try:
            module = importlib.import_module("comfyui_version")
        except ImportError:
            return None
    return str(getattr(module, "__version__", "")) or None


def parse_version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(g) for g in match.groups()) if match else None


def host_problem() -> str | None:
    """Why this ComfyUI cannot run the pack's V3 nodes, or None when it can."""
    wanted = ".".join(map(str, MIN_COMFYUI))
    found = version_of_host()
    try:
        api = importlib.import_module(API_MODULE)
    except ImportError as exc:
        return (f"diffinstruct needs ComfyUI >= {wanted} (its V3 node API {API_MODULE}); this ComfyUI "
                f"({found or 'version unknown'}) does not provide it ({exc}). Update ComfyUI.")
    missing = [n for n in API_NAMES if not hasattr(api.io, n)] + ([] if hasattr(api, "ComfyExtension")
                                                                   else ["ComfyExtension"])
    if missing:
        return (f"diffinstruct needs ComfyUI >= {wanted}: this ComfyUI ({found or 'version unknown'}) has "
                f"{API_MODULE} without {', '.join(missing)}. Update ComfyUI.")
    parsed = parse_version(found)
    if parsed is not None and parsed < MIN_COMFYUI:
        return (f"diffinstruct needs ComfyUI >= {wanted} (the oldest version it is tested with); this is {found}. "
                "Update ComfyUI.")
    return None
