"""Which files a ComfyUI node may write or read: ComfyUI's own folders only, unless the user opts in.

A ComfyUI server started with --listen runs any workflow anyone who reaches it queues, so a path typed into a
node is untrusted input. ComfyUI's save nodes refuse to write outside its output folder and its loaders read
only its registered model folders; the pack's nodes do the same:

* writes (Save's folder, Train / Align's checkpoint_dir) go under the output folder or the model folders the
  results belong in (loras, diffusion_models);
* reads (a model reward's weights_path) come from the registered model folders: `rewards` (registered here, at
  <models>/rewards, and extendable through extra_model_paths.yaml like every ComfyUI folder), loras,
  diffusion_models, checkpoints.

A relative path is taken relative to the first allowed folder. Paths are resolved before the check (symlinks
followed, ".." collapsed), so a link inside an allowed folder that points outside is refused. The environment
variable DIFFINSTRUCT_ALLOW_ANY_PATH=1 (off by default; documented in the README) lifts the rule for users who
run ComfyUI only for themselves. The command line is not concerned: it runs with the user's own rights.

`folder_paths` is ComfyUI's module; every function takes it as an argument so the rule is testable on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import PathNotAllowed

ALLOW_ENV = "DIFFINSTRUCT_ALLOW_ANY_PATH"
REWARDS_FOLDER = "rewards"
WRITE_MODEL_FOLDERS = ("loras", "diffusion_models")
READ_MODEL_FOLDERS = (REWARDS_FOLDER, "loras", "diffusion_models", "checkpoints")


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def register_rewards_folder(folder_paths: ModuleType) -> Path:
    """Register <models>/rewards as ComfyUI's `rewards` model folder (kept if extra_model_paths.yaml set it)."""
    default = Path(folder_paths.models_dir) / REWARDS_FOLDER
    if REWARDS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(REWARDS_FOLDER, str(default), is_default=True)
    return default


def _model_folders(folder_paths: ModuleType, names: Sequence[str]) -> list[Path]:
    roots: list[Path] = []
    for name in names:
        if name in folder_paths.folder_names_and_paths:
            roots += [Path(p) for p in folder_paths.get_folder_paths(name)]
    return roots


def write_roots(folder_paths: ModuleType) -> list[Path]:
    """Where nodes may write: the output folder first (relative paths land there), then the model folders."""
    return [Path(folder_paths.get_output_directory()), *_model_folders(folder_paths, WRITE_MODEL_FOLDERS)]


def read_roots(folder_paths: ModuleType) -> list[Path]:
    """Where nodes may read weights from: the registered model folders, `rewards` first."""
    return _model_folders(folder_paths, READ_MODEL_FOLDERS)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(value: str | os.PathLike[str], roots: Sequence[Path], what: str) -> Path:
    """`value` resolved (relative to roots[0] when relative), if it lies inside one of `roots` (resolved too), or
    PathNotAllowed naming `what` (the node's input) and the folders allowed; any path with the opt-in set."""
    raw = Path(value).expanduser()
    if not raw.is_absolute():
        if not roots:
            raise PathNotAllowed(f"{what} {str(value)!r}: ComfyUI registers no folder for it")
        raw = roots[0] / raw
    resolved = Path(os.path.realpath(raw))  # symlinks and ".." resolved, also for a path that does not exist yet
    if any_path_allowed():
        return resolved
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if any(_inside(resolved, r) for r in real_roots):
        return resolved
    allowed = ", ".join(str(r) for r in real_roots) or "(none registered)"
    raise PathNotAllowed(
        f"{what} {str(value)!r} is outside ComfyUI's folders (it resolves to {resolved}); this pack writes and reads "
        f"only under {allowed}. Use a path there (a relative one lands in {real_roots[0] if real_roots else '-'}), "
        f"add a folder through ComfyUI's extra_model_paths.yaml, or start ComfyUI with {ALLOW_ENV}=1 to allow any "
        "path (only on a machine nobody else can reach)")


def confine_write(value: str | os.PathLike[str], what: str, folder_paths: ModuleType | Any) -> Path:
    return confine(value, write_roots(folder_paths), what)


def confine_read(value: str | os.PathLike[str], what: str, folder_paths: ModuleType | Any) -> Path:
    return confine(value, read_roots(folder_paths), what)
