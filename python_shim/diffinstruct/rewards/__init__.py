"""Rewards: the interface the trainer calls, built-in weight-free rewards, and the reward models
(CLIP score, PickScore, LAION aesthetic v2, HPSv2, ImageReward, a Bradley-Terry preference model) loaded from local
files only.

Everything that needs `transformers` imports it lazily, so `import diffinstruct.rewards` stays light.
"""

from .base import (
    ImageScorer,
    ImplicitCFGReward,
    LatentToImageReward,
    NoisyReward,
    PixelReward,
    Reward,
    TargetReward,
    WeightedRewards,
)
from .builtin import BrightnessReward, ColorMatchReward, SaturationReward
from .convert import load_state_dict
from .paths import RewardWeightsNotFound, models_dir, reward_path
from .preference import PreferenceModel
from .preprocess import CLIP_MEAN, CLIP_STD, ClipPreprocess, TextFeatureCache
from .registry import NAMES, load_scorer, load_spec, parse_spec

_LAZY = {  # these import transformers when first used
    "AestheticHead": "clip", "AestheticScore": "clip", "ClipScore": "clip", "ClipTower": "clip", "PickScore": "clip",
    "load_aesthetic": "clip", "load_aesthetic_head": "clip", "load_clip_score": "clip", "load_clip_tower": "clip",
    "load_pickscore": "clip",
    "HPSv2Score": "hpsv2", "load_hpsv2": "hpsv2", "ImageRewardScore": "imagereward", "load_imagereward": "imagereward",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "NAMES",
    "BrightnessReward",
    "ColorMatchReward",
    "PreferenceModel",
    "RewardWeightsNotFound",
    "SaturationReward",
    "load_scorer",
    "load_spec",
    "load_state_dict",
    "models_dir",
    "parse_spec",
    "reward_path",
    *_LAZY,
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipPreprocess",
    "ImageScorer",
    "ImplicitCFGReward",
    "LatentToImageReward",
    "NoisyReward",
    "PixelReward",
    "Reward",
    "TargetReward",
    "TextFeatureCache",
    "WeightedRewards",
]
