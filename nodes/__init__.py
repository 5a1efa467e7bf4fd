"""Diff-Instruct++ nodes for ComfyUI (classic node API): compose DI++ in the graph or align in one click."""

from __future__ import annotations

from .compose import DIPPGeneratorLoss, DIPPReferenceScore, DIPPReward, DIPPRewardCombine, DIPPTAModel
from .tiny_demo import DIPPTinyDemoModels, DIPPTinyFidelity, DIPPTinyTasteReward
from .tools import DIPPEvaluate, DIPPOneStepSample, DIPPSave
from .train import DIPPAlign, DIPPTrain

NODE_CLASS_MAPPINGS = {
    "DIPPReferenceScore": DIPPReferenceScore,
    "DIPPTAModel": DIPPTAModel,
    "DIPPReward": DIPPReward,
    "DIPPRewardCombine": DIPPRewardCombine,
    "DIPPGeneratorLoss": DIPPGeneratorLoss,
    "DIPPTrain": DIPPTrain,
    "DIPPAlign": DIPPAlign,
    "DIPPOneStepSample": DIPPOneStepSample,
    "DIPPSave": DIPPSave,
    "DIPPEvaluate": DIPPEvaluate,
    "DIPPTinyDemoModels": DIPPTinyDemoModels,
    "DIPPTinyTasteReward": DIPPTinyTasteReward,
    "DIPPTinyFidelity": DIPPTinyFidelity,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DIPPReferenceScore": "DI++ Reference Score",
    "DIPPTAModel": "DI++ TA Model",
    "DIPPReward": "DI++ Reward",
    "DIPPRewardCombine": "DI++ Reward Combine",
    "DIPPGeneratorLoss": "DI++ Generator Loss",
    "DIPPTrain": "DI++ Train",
    "DIPPAlign": "DI++ Align (one click)",
    "DIPPOneStepSample": "DI++ One-Step Sample",
    "DIPPSave": "DI++ Save",
    "DIPPEvaluate": "DI++ Evaluate",
    "DIPPTinyDemoModels": "DI++ Tiny Demo Models",
    "DIPPTinyTasteReward": "DI++ Tiny Taste Reward",
    "DIPPTinyFidelity": "DI++ Tiny Fidelity",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
