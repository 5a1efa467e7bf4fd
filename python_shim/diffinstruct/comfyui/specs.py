"""The values that flow between the pack's graph nodes: plain, checked descriptions, built into engine
objects only when a training or evaluation node runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_finite
from ..config import METHODS, NESTED, train_option
from ..errors import ConfigError
from ..rewards.registry import NAMES as REWARD_NAMES

TA_MODES = ("lora", "full")
WEIGHTINGS = ("normalized", "unit")
METHOD_LABELS = {"DI++": "dipp", "DI": "di", "DI*": "distar"}
MAX_ALPHA = 1e6
MAX_OMEGA = 100.0


def check_number(name: str, value: Any, low: float, high: float) -> float:
    check_finite(name, value)
    if not low <= value <= high:
        raise ConfigError(f"{name} = {value:g} is out of range [{low:g}, {high:g}]")
    return float(value)


def check_alpha(alpha: Any) -> float:
    return check_number("alpha (reward scale)", alpha, 0.0, MAX_ALPHA)


def check_omega(omega: Any) -> float:
    return check_number("omega (CFG scale of the reference score)", omega, 1.0, MAX_OMEGA)


@dataclass
class ReferenceSpec:
    """The teacher score: a MODEL with positive / negative conditioning and CFG scale omega."""

    model: Any
    positive: Any
    negative: Any
    omega: float = train_option("omega")

    def __post_init__(self) -> None:
        self.omega = check_omega(self.omega)
        from .host import guidance_distilled

        if self.omega != 1.0 and guidance_distilled(self.model):
            raise ConfigError(
                f"omega = {self.omega:g} cannot apply: this MODEL is guidance-distilled (as Flux.1 dev), so it is "
                f"guided by the guidance value in its conditioning (set it with FluxGuidance on the positive "
                f"conditioning; the model's default is 3.5), not by CFG's unconditional pass; set omega to 1")


@dataclass
class TASpec:
    """The TA (fake-score) network: LoRA on the shared frozen base, or a full trainable copy."""

    mode: str = "lora"
    rank: int = 8
    learning_rate: float = train_option("lr_ta", default=1e-4)
    model: Any = None  # the MODEL it starts from (must be the reference's); None: the reference's

    def __post_init__(self) -> None:
        if self.mode not in TA_MODES:
            raise ConfigError(f"TA mode must be one of {', '.join(TA_MODES)}, got {self.mode!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise ConfigError(f"LoRA rank must be an integer in [1, 1024], got {self.rank!r}")
        self.learning_rate = check_number("TA learning rate", self.learning_rate, 0.0, 1.0)


@dataclass
class RewardTerm:
    weight: float
    name: str
    path: str | None = None


def check_reward_weights(name: str, path: str | None, models: str | None) -> None:
    """The Reward node's check before anything runs: without a `weights_path`, a model reward's weights are in
    <models>/rewards/<kind>, where they will be read from; RewardWeightsNotFound names the place and the files.
    Only presence is checked here; the files' contents are checked when the reward loads."""
    from ..rewards.paths import missing, reward_path
    from ..rewards.registry import MODEL_REWARDS, canonical

    kind = canonical(name)
    if kind not in MODEL_REWARDS or path:  # an explicit path is RewardSpec's check (it names the path as typed)
        return
    if kind == "preference":
        raise ConfigError("the preference reward needs weights_path: the .safetensors a preference fit wrote")
    where = reward_path(kind, None, models)
    if not where.exists():
        raise missing(kind, where, "the weights")


@dataclass
class RewardSpec:
    """A weighted sum of registry rewards (built-ins, or model rewards read from local files)."""

    terms: list[RewardTerm] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.terms:
            raise ConfigError("a reward needs at least one term")
        for term in self.terms:
            key = term.name.lower()
            if key not in REWARD_NAMES:
                raise ConfigError(f"unknown reward {term.name!r}; available: {', '.join(REWARD_NAMES)}")
            check_number(f"weight of reward {term.name}", term.weight, -1e6, 1e6)
            if term.path:
                p = Path(term.path).expanduser()
                if not p.exists():
                    raise FileNotFoundError(f"reward {term.name}: weights file {p} does not exist; put the model "
                                            "there or leave the path empty to use ComfyUI's models folder")
                if p.is_file() and not os.access(p, os.R_OK):
                    raise PermissionError(f"reward {term.name}: weights file {p} is not readable")

    def spec_string(self) -> str:
        return "+".join(f"{t.weight:g}*{t.name}" + (f"@{t.path}" if t.path else "") for t in self.terms)

    def combined(self, other: RewardSpec, weight_self: float, weight_other: float) -> RewardSpec:
        terms = [RewardTerm(t.weight * weight_self, t.name, t.path) for t in self.terms]
        terms += [RewardTerm(t.weight * weight_other, t.name, t.path) for t in other.terms]
        return RewardSpec(terms)


@dataclass
class LossSpec:
    """The generator objective: reference score + TA + reward (alpha), weighting and sigma distribution."""

    reference: ReferenceSpec = train_option(NESTED)
    ta: TASpec = train_option(NESTED)
    reward: RewardSpec | None
    alpha: float = train_option("alpha")
    method: str = train_option("method", default="dipp")
    weighting: str = train_option("generator_weighting", default="normalized")
    p_mean: float = train_option("p_mean", default=-2.0)
    p_std: float = train_option("p_std", default=2.0)

    def __post_init__(self) -> None:
        self.method = METHOD_LABELS.get(self.method, self.method)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHOD_LABELS)}, got {self.method!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        self.alpha = check_alpha(self.alpha)
        if self.method == "di" and self.alpha != 0.0:
            raise ConfigError("DI has no reward: set alpha = 0, or choose DI++ / DI*")
        if self.alpha != 0.0 and self.reward is None:
            raise ConfigError(f"alpha = {self.alpha:g} needs a reward: connect a Reward node, or set alpha = 0")
        self.p_mean = check_number("sigma distribution P_mean", self.p_mean, -10.0, 10.0)
        self.p_std = check_number("sigma distribution P_std", self.p_std, 0.0, 10.0)


@dataclass
class TrainedWeights:
    """What Train / Align produce for Save: LoRA (ComfyUI key format) or full network weights, with metadata."""

    kind: str  # "lora" or "full"
    tensors: dict[str, Any]
    metadata: dict[str, str]
    comfy_format: bool  # keys are ComfyUI's (diffusion_model.* LoRA / UNETLoader state dict)
