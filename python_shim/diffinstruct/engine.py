"""Building the engine: one DITrainer from networks, prompts, a training config and a reward, for every host.

The command line (a problem's Built parts and its [train] table), the ComfyUI nodes (LossSpec and their
TrainOptions), the tiny demo and the memory benchmark all build their trainer here, so a run is assembled the
same way whoever starts it; runner.run then trains it.

    models = engine.assemble(teacher, latent_shape, mode="shared", rank=8, seed=run_seed)
    trainer = engine.build_engine(models, prompts, engine.trainer_config(loss_spec, train_options), reward)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import DIConfig, train_options
from .errors import ConfigError

if TYPE_CHECKING:
    from .denoisers import Denoiser
    from .prompts import PromptList
    from .rewards import Reward
    from .trainer import DITrainer, Models

ConfigSource = DIConfig | Mapping[str, Any] | Any  # Any: a host spec dataclass with train_option fields


def trainer_config(*sources: ConfigSource, **options: Any) -> DIConfig:
    """The validated DIConfig of `sources` (later ones win), then `options`.

    A source is a DIConfig, a mapping of DIConfig option names (the CLI's [train] table), or a host's spec
    dataclass whose fields say which option they set (config.train_option, e.g. comfyui/specs.LossSpec).
    Unknown option names are refused by DIConfig.from_dict with the list of valid ones.
    """
    merged: dict[str, Any] = {}
    for source in sources:
        if isinstance(source, DIConfig):
            merged.update(source.to_dict())
        elif isinstance(source, Mapping):
            merged.update(source)
        elif dataclasses.is_dataclass(source) and not isinstance(source, type):
            merged.update(train_options(source))
        else:
            raise ConfigError(f"cannot read training options from a {type(source).__name__}")
    merged.update(options)
    return DIConfig.from_dict(merged)


def assemble(teacher: Denoiser, latent_shape: tuple[int, ...], *, mode: str = "shared", rank: int = 8,
             sigma_init: float | None = None, generator_init: Denoiser | None = None,
             target: Callable[[str, nn.Module], bool] | None = None, seed: int | None = None,
             device: torch.device | str | None = None) -> Models:
    """assembly.build_models, optionally with a seeded adapter init and the networks moved to `device`.

    seed: LoRA's random init comes from it, inside a forked RNG so the caller's (a host's) global stream is left
    as it was; None draws from the global stream. device: where new adapter layers go (they are made on the CPU).
    """
    from .assembly import build_models

    kwargs: dict[str, Any] = {"target": target} if target is not None else {}
    if seed is None:
        models = build_models(teacher, latent_shape, mode=mode, rank=rank, sigma_init=sigma_init,
                              generator_init=generator_init, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models = build_models(teacher, latent_shape, mode=mode, rank=rank, sigma_init=sigma_init,
                                  generator_init=generator_init, **kwargs)
    if device is not None:
        for module in models.modules:
            module.to(device)
    return models


def build_engine(models: Models, prompts: PromptList, config: ConfigSource, reward: Reward | None = None, *,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 data_parallel: bool = False) -> DITrainer:
    """The trainer of one run.

    config: a DIConfig, or anything trainer_config reads. rank / world_size: this process's place in a torchrun
    job (its random streams are keyed by rank). data_parallel: wrap the trainer for the running process group
    (distributed.wrap_trainer; nothing in a single process).
    """
    from .trainer import DITrainer

    cfg = config if isinstance(config, DIConfig) else trainer_config(config)
    trainer = DITrainer(cfg, models, prompts, reward=reward, device=device, rank=rank, world_size=world_size)
    if data_parallel:
        from . import distributed

        distributed.wrap_trainer(trainer)
    return trainer
