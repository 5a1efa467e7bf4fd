"""The ComfyUI side of diffinstruct, in one folder on both install routes (docs/COMFYUI.md section 1).

    nodes/        the node declarations (the repository's top-level nodes/ is a link to this folder)
    registry.py   node ids and display names; `exports()`, what a pack's __init__ gives ComfyUI
    v3.py         the declarations as V3 nodes (comfy_api v0_0_2)
    version.py    which ComfyUI this is, and whether it is new enough
    host.py       ComfyUI's MODEL / CLIP / VAE seen through the engine's interfaces
    specs.py      what the composing nodes pass along (reference, TA, reward, loss)
    training.py   one Train / Align run: engine, live view, checkpoints, results
    live.py, runs.py, files.py, paths.py, thumbnails.py, tiny_models.py: previews, run folders, saved weights,
                  the folders a node may touch, template thumbnails, the tiny demo's models
    install.py    the wheel's loader in custom_nodes/ (`diffinstruct comfyui install`)
    web/          the canvas extension; workflows/ links to the repository's templates

The clone route (the repository root's __init__.py) and the wheel's loader both import this package; nothing in
it imports ComfyUI until a node runs inside it.
"""

from __future__ import annotations

from .install import (
    CLONE_MARKER,
    LOADER_NAME,
    MARKER,
    command,
    install,
    loader_exports,
    pack_folder,
    sync_workflows,
    uninstall,
)

__all__ = ["CLONE_MARKER", "LOADER_NAME", "MARKER", "command", "install", "loader_exports", "pack_folder",
           "sync_workflows", "uninstall"]
