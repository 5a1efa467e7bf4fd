"""Training configuration: defaults from docs/ALGORITHM.md section 10 (Project decisions), validated up front."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checks import check_finite, check_int
from .errors import ConfigError

METHODS = ("di", "dipp", "distar")
GENERATOR_WEIGHTINGS = ("normalized", "unit")
TA_WEIGHTINGS = ("edm", "unit")
REDUCTIONS = ("mean", "sum")
DISTAR_WEIGHTINGS = ("sigma2", "unit")
TA_SAMPLES = ("reuse", "fresh", "onepass")
REFERENCE_PASSES = ("joint", "split")


@dataclass
class DIConfig:
    """Every option of a DI / DI++ / DI* run.

    alpha convention: G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B with W_b = 1 / mean|x0 - D_ref| per sample
    (generator_weighting="normalized", floored; 1 with "unit"), so alpha weighs the per-image reward gradient
    against the IKL direction measured in units of the reference's mean per-element distance to the sample (not
    against a direction of unit magnitude); alpha is recorded in every checkpoint's metadata.
    """

    method: str = "dipp"
    alpha: float = 0.0
    omega: float = 1.0
    sigma_init: float | None = None
    p_mean: float = -2.0
    p_std: float = 2.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    generator_weighting: str = "normalized"
    ta_weighting: str = "edm"
    ta_reduction: str = "mean"
    sigma_data: float = 0.5
    # DI* pseudo-Huber: c = huber_c * sqrt(elements per sample), i.e. huber_c is a per-element RMS
    # score disagreement. 1.0 keeps d quadratic only once teacher and TA agree to about sigma^2 per
    # element (2 % of the data scale at the median sigma e^-2) and norm-like (robust) before.
    huber_c: float = 1.0
    distar_weighting: str = "sigma2"
    lr_generator: float = 5e-6
    lr_ta: float = 5e-6
    beta1: float = 0.0
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    ta_steps: int = 1
    # the pass plan (docs/ALGORITHM.md section 4): "reuse" trains the TA on the generator step's detached sample
    # (4 network passes an iteration, as a plain loop would), "fresh" draws its own sample first (one more generator
    # forward), "onepass" trains it on the generator step's own x_t, so one TA forward serves both halves (3 passes,
    # faster; the generator's and the TA's graphs are alive together: more memory); "joint" runs the reference's cond
    # and uncond as one batch of 2B, "split" as two of B (less memory)
    ta_sample: str = "reuse"
    reference_pass: str = "joint"
    ema_decay: float = 0.95
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    bf16: bool = False
    max_bad_steps: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DIConfig:
        def choice(key: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of {', '.join(allowed)}")

        def number(key: str, low: float | None = None, high: float | None = None, open_low: bool = False,
                   allow_none: bool = False) -> None:
            value = getattr(self, key)
            if value is None and allow_none:
                return
            check_finite(key, value)
            if low is not None and (value <= low if open_low else value < low):
                raise ConfigError(f"{key} = {value} must be {'>' if open_low else '>='} {low}")
            if high is not None and value > high:
                raise ConfigError(f"{key} = {value} must be <= {high}")

        def integer(key: str, low: int) -> None:
            check_int(key, getattr(self, key), low)

        choice("method", METHODS)
        choice("generator_weighting", GENERATOR_WEIGHTINGS)
        choice("ta_weighting", TA_WEIGHTINGS)
        choice("ta_reduction", REDUCTIONS)
        choice("distar_weighting", DISTAR_WEIGHTINGS)
        choice("ta_sample", TA_SAMPLES)
        choice("reference_pass", REFERENCE_PASSES)
        number("alpha", 0.0)
        number("omega", 0.0, 100.0)
        number("sigma_init", 0.0, open_low=True, allow_none=True)
        number("p_mean")
        number("p_std", 0.0)
        number("sigma_min", 0.0, open_low=True, allow_none=True)
        number("sigma_max", 0.0, open_low=True, allow_none=True)
        number("sigma_data", 0.0, open_low=True)
        number("huber_c", 0.0, open_low=True)
        number("lr_generator", 0.0)
        number("lr_ta", 0.0)
        number("beta1", 0.0, 0.999999)
        number("beta2", 0.0, 0.999999)
        number("adam_eps", 0.0, open_low=True)
        number("weight_decay", 0.0)
        number("ema_decay", 0.0, 1.0)
        integer("ta_steps", 1)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        integer("seed", 0)
        integer("max_bad_steps", 1)
        if self.ta_sample == "onepass" and self.method == "distar":
            raise ConfigError("ta_sample = 'onepass' needs method = 'di' or 'dipp' (DI*'s pass through the TA is a "
                              "VJP with the TA frozen); use ta_sample = 'reuse'")
        if self.method == "di" and self.alpha != 0.0:
            raise ConfigError("alpha must be 0 with method = 'di' (use 'dipp' for a reward)")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_max < self.sigma_min:
            raise ConfigError(f"sigma_max ({self.sigma_max}) must be >= sigma_min ({self.sigma_min})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DIConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        return cls(**data).validate()


# Hosts describe a run in their own words (the ComfyUI LossSpec, the nodes' TrainOptions); a field of such a spec
# that is a training option says which DIConfig option it is in its metadata, so engine.trainer_config turns any
# spec into a DIConfig without a hand-written copy that would drift when DIConfig gains an option.
TRAIN_OPTION = "diffinstruct.train_option"
NESTED = "*"  # the field holds a spec whose own fields name options (e.g. LossSpec.reference)


def train_option(name: str, **kwargs: Any) -> Any:
    """A dataclass field (dataclasses.field(**kwargs)) that sets DIConfig option `name`, or NESTED."""
    return field(metadata={TRAIN_OPTION: name}, **kwargs)


def train_options(spec: Any) -> dict[str, Any]:
    """The DIConfig options the train_option fields of the dataclass instance `spec` set, nested specs included."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        name = f.metadata.get(TRAIN_OPTION)
        if name == NESTED:
            out.update(train_options(getattr(spec, f.name)))
        elif name is not None:
            out[name] = getattr(spec, f.name)
    return out


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse
