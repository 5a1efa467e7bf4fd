"""The run layer: a run's TOML file -> RunSpec -> the problem's models, reward and trainer; weights back from a
checkpoint. The command line (cli.py) and any script use it the same way:

    from diffinstruct import run
    spec = run.load_config("run.toml")                 # every section checked; ConfigError names the key
    trainer, built = run.build_trainer(spec)
    ckpt, spec, meta, built = run.load_weights("runs/my_run")   # EMA weights in the generator

    options.py       the TOML option schema (Option, check_section)
    spec.py          RunSpec and the [run] options
    parse.py         parse_config, load_config, apply_overrides (the command line's overrides)
    problems.py      the Problem / RewardKind registries
    plugins.py       problems imported by name on first use (diffusers_problem.py)
    reward_kinds.py  the built-in [reward] kinds: none, target, image
    toy2d.py         the "toy2d" problem; diffusers_problem.py the "diffusers" one (imported on first use)
    builders.py      build, build_reward, build_trainer
    weights.py       spec_for_checkpoint, load_weights
    commands.py      what train / sample / eval / demo do with their parsed arguments

Nothing here imports torch at import time, so a config is validated before any model library loads.
"""

from ..errors import ConfigError
from . import reward_kinds as _reward_kinds  # noqa: F401 - registers the built-in reward kinds
from .builders import build, build_reward, build_trainer, load_generator_init
from .options import REQUIRED, Option, check_section
from .parse import apply_overrides, load_config, parse_config
from .plugins import PLUGINS, load_plugin, problem_names
from .problems import (
    PROBLEMS,
    REWARDS,
    Built,
    Problem,
    RewardKind,
    register_problem,
    register_reward,
    takes_image_rewards,
)
from .spec import RUN_OPTIONS, RunSpec
from .toy2d import Toy2D
from .weights import load_weights, spec_for_checkpoint

__all__ = [
    "PLUGINS", "PROBLEMS", "REQUIRED", "REWARDS", "RUN_OPTIONS", "Built", "ConfigError", "Option", "Problem",
    "RewardKind", "RunSpec", "Toy2D", "apply_overrides", "build", "build_reward", "build_trainer", "check_section",
    "load_config", "load_generator_init", "load_plugin", "load_weights", "parse_config", "problem_names",
    "register_problem", "register_reward", "spec_for_checkpoint", "takes_image_rewards",
]
