"""The built-in [reward] kinds: "none", "target" (a point the samples are pulled to) and "image" (a reward spec
scored on the problem's images). Problems add their own kinds with register_reward (e.g. "latent_target")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .options import Option
from .problems import PROBLEMS, RewardKind, register_reward
from .spec import RunSpec


def _target_check(options: dict[str, Any], spec: RunSpec) -> None:
    n = PROBLEMS[spec.problem].data_numel(spec)
    if n is not None and len(options["target"]) != n:
        raise ConfigError(f"[reward] target must have {n} numbers (one per data element of problem "
                          f"{spec.problem!r}), got {len(options['target'])}")


def _target_build(options: dict[str, Any], spec: RunSpec) -> Any:
    import torch

    from ..rewards import TargetReward

    return TargetReward(torch.tensor(options["target"], dtype=torch.float32))


def _image_check(options: dict[str, Any], spec: RunSpec) -> None:
    from ..rewards.registry import check_spec

    try:
        check_spec(options["spec"])
    except ValueError as exc:
        raise ConfigError(f"[reward] spec = {options['spec']!r}: {exc}") from None
    if options["models_dir"] and not Path(options["models_dir"]).expanduser().is_dir():
        raise ConfigError(f"[reward] models_dir = {options['models_dir']!r} is not a directory")


def _image_build(options: dict[str, Any], spec: RunSpec) -> Any:
    from ..errors import RewardWeightsNotFound
    from ..rewards import load_spec

    try:
        scorer = load_spec(options["spec"], models_dir=options["models_dir"] or None)
    except (RewardWeightsNotFound, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"[reward] spec = {options['spec']!r}: {exc}") from None
    return PROBLEMS[spec.problem].image_reward(scorer, spec)


register_reward(RewardKind("none", {}, lambda options, spec: None))
register_reward(RewardKind("image", {
    "spec": Option("str", help="reward spec, terms [WEIGHT*]NAME[@PATH] joined by '+', e.g. "
                               "\"0.5*pickscore+aesthetic@/weights/aes.safetensors\""),
    "models_dir": Option("str", "", help="models folder for reward weights (default: $DIFFINSTRUCT_MODELS_DIR or "
                                         "ComfyUI's)")}, _image_build, _image_check))
register_reward(RewardKind("target", {"target": Option("floats", help="the point samples are pulled to, e.g. "
                                                                        "[1.0, 1.0]")},
                           _target_build, _target_check))
