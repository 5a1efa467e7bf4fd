"""Problems whose module imports torch and a host library at import time, imported by name on first use, so
validating a toy run never loads diffusers. Importing such a module registers its problem (and reward kinds)
with problems.register_problem; this module sits above the registry, so the plugin's own import of the
registry is no cycle.
"""

from __future__ import annotations

import importlib

from .problems import PROBLEMS

PLUGINS: dict[str, str] = {"diffusers": f"{__package__}.diffusers_problem"}


def load_plugin(name: str) -> None:
    """Import the plugin module of problem `name` unless that problem is registered (or is no plugin)."""
    if name not in PROBLEMS and name in PLUGINS:
        importlib.import_module(PLUGINS[name])


def problem_names() -> list[str]:
    """Every problem `[run] problem` may name: the registered ones, then the plugins not imported yet."""
    return [*PROBLEMS, *(p for p in PLUGINS if p not in PROBLEMS)]
