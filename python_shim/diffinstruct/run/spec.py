"""A run as the engine sees it: `RunSpec`, the validated TOML file, and the options of its [run] section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DIConfig
from .options import Option

RUN_OPTIONS: dict[str, Option] = {
    "problem": Option("str", help="which problem to train, e.g. \"toy2d\""),
    "steps": Option("int", low=1, help="total training steps"),
    "out_dir": Option("str", help="directory for checkpoints and metrics (relative to the working directory)"),
    "checkpoint_every": Option("int", 100, low=1),
    "keep": Option("int", 3, low=0, help="newest checkpoints to keep; 0 keeps all"),
    "seed": Option("int", 0, low=0, help="model initialisation; also [train] seed unless that is set"),
    "eval_every": Option("int", 0, low=0, help="evaluate every N steps (0: never during training)"),
    "eval_samples": Option("int", 1000, low=1),
    "base_model": Option("str", "", help="free-form name of the base model, stored in checkpoints"),
    "generator_init": Option("str", "", help="a checkpoint or run directory (from `train`) whose EMA generator "
                                             "weights the generator starts from; empty: the problem's own init"),
}


def train_section_options() -> dict[str, Option]:
    """Options of [train], derived from DIConfig's fields (kinds from their annotations; values by validate()),
    so a new DIConfig field is a valid [train] key without touching this file."""
    simple = {"str": "str", "float": "float", "int": "int", "bool": "bool"}
    options = {}
    for f in dataclasses.fields(DIConfig):
        t = str(f.type).replace(" ", "")
        base = t.removesuffix("|None").removeprefix("None|")
        kind = simple.get(base, "table" if base.startswith("dict") else "any")
        options[f.name] = Option(kind, None, nullable="None" in t)
    return options


@dataclass
class RunSpec:
    """A validated run description (the TOML file, checked and with defaults filled)."""

    problem: str
    steps: int
    out_dir: Path
    checkpoint_every: int
    keep: int
    seed: int
    eval_every: int
    eval_samples: int
    base_model: str
    train: DIConfig
    problem_options: dict[str, Any]
    reward: dict[str, Any]
    source: str | None = None
    generator_init: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The TOML structure again (stored in checkpoints, so `sample`/`eval` need no config file)."""
        train = self.train.to_dict()
        if not train.get("extra"):
            train.pop("extra", None)
        return {
            "run": {"problem": self.problem, "steps": self.steps, "out_dir": str(self.out_dir),
                    "checkpoint_every": self.checkpoint_every, "keep": self.keep, "seed": self.seed,
                    "eval_every": self.eval_every, "eval_samples": self.eval_samples,
                    "base_model": self.base_model, "generator_init": self.generator_init},
            "train": {k: v for k, v in train.items() if v is not None},
            self.problem: dict(self.problem_options),
            "reward": dict(self.reward),
        }
