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
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import PathNotAllowed

ALLOW_ENV = "DIFFINSTRUCT_ALLOW_ANY_PATH"
REWARDS_FOLDER = "rewards"
WRITE_MODEL_FOLDERS = ("loras", "diffusion_models")
READ_MODEL_FOLDERS = (REWARDS_FOLDER, "loras", "diffusion_models", "checkpoints")
AUTO = "auto"  # the Reward node's weights_path for "the reward's own folder, <models>/rewards/<kind>"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LIST_DEPTH = 2  # the Reward node lists rewards/<kind>/ folders and the weight files up to two levels down


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


def confine(value: str | os.PathLike[str], roots: Sequence[Path], what: str, shown: str | None = None) -> Path:
    """`value` resolved (relative to roots[0] when relative), if it lies inside one of `roots` (resolved too), or
    PathNotAllowed naming `what` (the node's input) as the user typed it (`shown`, default `value`) and the folders
    allowed; any path with the opt-in set."""
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
    typed = shown if shown is not None else str(value)
    raise PathNotAllowed(
        f"{what} {typed!r} is outside ComfyUI's folders (it resolves to {resolved}); this pack writes and reads "
        f"only under {allowed}. Use a path there (a relative one lands in {real_roots[0] if real_roots else '-'}), "
        f"add a folder through ComfyUI's extra_model_paths.yaml, or start ComfyUI with {ALLOW_ENV}=1 to allow any "
        "path (only on a machine nobody else can reach)")


def confine_write(value: str | os.PathLike[str], what: str, folder_paths: ModuleType | Any) -> Path:
    return confine(value, write_roots(folder_paths), what)


def confine_read(value: str | os.PathLike[str], what: str, folder_paths: ModuleType | Any) -> Path:
    return confine(value, read_roots(folder_paths), what)


# ============================================================================== what the nodes call
def host_folders() -> ModuleType | None:
    """ComfyUI's folder_paths when the node runs inside ComfyUI (ComfyUI imports it before it loads any pack), else
    None: a node called as a plain function (the tests without ComfyUI) runs with its caller's rights, like the CLI."""
    return sys.modules.get("folder_paths")


def node_write(value: str | os.PathLike[str], what: str) -> Path:
    """Where a node may write `value` (the input named `what`): confined inside ComfyUI, as given outside it."""
    fp = host_folders()
    return confine_write(value, what, fp) if fp is not None else Path(value).expanduser()


def node_read(value: str | os.PathLike[str], what: str) -> Path:
    """Where a node may read `value` from: one of ComfyUI's registered model folders inside ComfyUI."""
    fp = host_folders()
    return confine_read(value, what, fp) if fp is not None else Path(value).expanduser()


def refusal(check: Any, *args: Any) -> bool | str:
    """A queue-time check for VALIDATE_INPUTS: True, or the refusal's message (shown on the node)."""
    try:
        check(*args)
    except PathNotAllowed as exc:
        return str(exc)
    return True


def _listed(root: Path) -> list[str]:
    names: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        rel = Path(folder).relative_to(root)
        depth = len(rel.parts)
        if depth >= LIST_DEPTH:
            dirs.clear()
        dirs.sort()
        names += [(rel / d).as_posix() for d in dirs if not d.startswith(".")]
        names += [(rel / f).as_posix() for f in sorted(files) if f.lower().endswith(WEIGHT_SUFFIXES)]
    return names


def reward_choices() -> list[str]:
    """The Reward node's weights_path list, as core loaders list their folder: AUTO, then every folder and weight
    file in ComfyUI's `rewards` folders (relative names; AUTO alone outside ComfyUI)."""
    fp = host_folders()
    if fp is None:
        return [AUTO]
    register_rewards_folder(fp)
    seen: list[str] = []
    allowed = [Path(os.path.realpath(r)) for r in read_roots(fp)]
    for root in _model_folders(fp, (REWARDS_FOLDER,)):
        if root.is_dir():  # a link leading out of ComfyUI's folders is not offered (it would be refused)
            seen += [n for n in _listed(root) if n not in seen
                     and any(_inside(Path(os.path.realpath(root / n)), a) for a in allowed)]
    return [AUTO, *sorted(seen)]


def reward_weights(value: str) -> str | None:
    """The Reward node's weights_path as a path to load: None for AUTO (or empty); inside ComfyUI a name from the
    list, found in the `rewards` folders, or an absolute path in a registered model folder (PathNotAllowed
    otherwise; FileNotFoundError when it is in none of them); outside ComfyUI the path as given."""
    text = value.strip()
    if not text or text == AUTO:
        return None
    fp = host_folders()
    if fp is None:
        return str(Path(text).expanduser())
    register_rewards_folder(fp)
    if Path(text).expanduser().is_absolute():
        return str(confine_read(text, "weights_path", fp))
    roots = _model_folders(fp, (REWARDS_FOLDER,))
    for root in roots:
        candidate = confine(root / text, read_roots(fp), "weights_path", shown=text)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"weights_path {text!r} is in none of ComfyUI's rewards folders "
                            f"({', '.join(str(r) for r in roots)}); put it there or choose {AUTO!r}")
