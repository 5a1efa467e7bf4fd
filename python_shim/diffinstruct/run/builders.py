"""From a RunSpec to the objects a run trains: the problem's models and reward, and the trainer around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .problems import PROBLEMS, REWARDS, Built
from .spec import RunSpec


def build(spec: RunSpec) -> Built:
    return PROBLEMS[spec.problem].build(spec)


def build_reward(spec: RunSpec) -> Any:
    return REWARDS[spec.reward["name"]].build({k: v for k, v in spec.reward.items() if k != "name"}, spec)


def load_generator_init(spec: RunSpec, built: Built) -> Any:
    """Copies the EMA generator weights of the checkpoint [run] generator_init names into the generator.

    The checkpoint must come from a run of the same generator architecture (same problem options, memory mode and
    LoRA rank); anything else is refused with CheckpointError naming the mismatch. Returns the CheckpointInfo."""
    from .. import checkpoint

    path = Path(spec.generator_init).expanduser()
    if not path.exists():
        raise ConfigError(f"[run] generator_init / --init-generator: {path} does not exist (expected a checkpoint "
                          "step-NNNNNN directory or a run directory written by `python -m diffinstruct train`)")
    try:
        return checkpoint.load_params(path, "ema", built.models.generator_params)
    except checkpoint.CheckpointError as exc:
        raise checkpoint.CheckpointError(f"[run] generator_init / --init-generator {path}: cannot start the "
                                         f"generator from it: {exc}") from None


def build_trainer(spec: RunSpec, rank: int = 0, world_size: int = 1, init_generator: bool = True,
                  data_parallel: bool = False) -> tuple[Any, Built]:
    """rank / world_size: this process's place in a torchrun job (its random streams are keyed by rank).
    init_generator=False skips [run] generator_init (a resumed run restores its own weights instead).
    data_parallel: wrapped for the running process group (engine.build_engine; nothing in a single process)."""
    from ..engine import build_engine

    built = build(spec)
    if spec.generator_init and init_generator:  # before the trainer exists, so its EMA starts there too
        built.extras["generator_init"] = str(load_generator_init(spec, built).path)
    return build_engine(built.models, built.prompts, spec.train, built.reward, rank=rank,
                        world_size=world_size, data_parallel=data_parallel), built
