"""The problem and reward registries: what `[run] problem` and `[reward] name` may name.

A problem is a `Problem` subclass instance added by `register_problem`; a reward kind is a `RewardKind` added by
`register_reward`. The built-in toy 2-D problem (toy2d.py) and reward kinds (reward_kinds.py) register when the
run package is imported; problems whose module imports a host library are plugins (plugins.py), imported by
name on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .options import Option
from .spec import RunSpec


@dataclass
class Built:
    """What a problem builds for training or sampling."""

    models: Any  # trainer.Models
    prompts: Any  # prompts.PromptList
    reward: Any  # rewards.Reward | None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardKind:
    """A reward selectable by [reward] name = ...; `build(options, spec)` returns a Reward (or None)."""

    name: str
    options: dict[str, Option]
    build: Callable[[dict[str, Any], RunSpec], Any]
    check: Callable[[dict[str, Any], RunSpec], None] | None = None


class Problem:
    """A training problem: its [<name>] options, and how to build, sample and evaluate it.

    Subclasses set `name`, `options`, `rewards` and implement the methods; `register_problem` adds one.
    Methods receive the validated RunSpec. `evaluate` and `sample` use the generator weights in place
    (the commands load EMA weights into them first).
    """

    name: str = ""
    options: dict[str, Option] = {}
    rewards: tuple[str, ...] = ("none",)

    def check(self, spec: RunSpec) -> None:
        """Cross-field checks (raise ConfigError); called before any work starts."""

    def data_numel(self, spec: RunSpec) -> int | None:
        """Elements per sample, for rewards whose options depend on it (None when unknown before building)."""
        return None

    def build(self, spec: RunSpec) -> Built:
        raise NotImplementedError

    def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
               plot_path: Path | None) -> dict[str, Any]:
        raise NotImplementedError

    def image_reward(self, scorer: Any, spec: RunSpec) -> Any:
        """The trainer's Reward for an image scorer (images [B, 3, H, W] in [0, 1] + prompts -> [B], e.g. from
        rewards.load_spec). Problems whose samples are images override this (rewards.PixelReward for pixel-space
        generators, rewards.LatentToImageReward with a differentiable decoder for latent ones)."""
        raise ConfigError(f"problem {self.name!r} takes no image rewards (its samples are not images); its rewards: "
                          f"{', '.join(self.rewards)}")

    def generate_images(self, built: Built, spec: RunSpec, prompts: Sequence[str], seed: int) -> Any:
        """One image per prompt from the generator, a tensor [N, 3, H, W] in [0, 1] (for `eval --prompts`)."""
        raise ConfigError(f"problem {self.name!r} cannot generate images for prompts, so reward statistics over a "
                          "prompt set (`eval --checkpoint --prompts`) do not apply to it; `eval --checkpoint` without "
                          "--prompts reports its own metrics")


def takes_image_rewards(problem: Problem) -> bool:
    """True when the problem overrides Problem.image_reward (its samples are images)."""
    return type(problem).image_reward is not Problem.image_reward


PROBLEMS: dict[str, Problem] = {}
REWARDS: dict[str, RewardKind] = {}

def register_problem(problem: Problem) -> Problem:
    PROBLEMS[problem.name] = problem
    return problem


def register_reward(kind: RewardKind) -> RewardKind:
    REWARDS[kind.name] = kind
    return kind
