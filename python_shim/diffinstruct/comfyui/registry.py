"""The node pack's registry: every node's id, declaration and display name, and what ComfyUI is given.

The declarations (nodes/: inputs, outputs, tooltips, the function that runs each) need nothing from ComfyUI;
inside ComfyUI the pack registers them as V3 nodes (v3.py, comfy_api v0_0_2) through
`comfy_entrypoint`, and outside it (tests, tools) `exports()` hands out the declarations themselves.
"""

from __future__ import annotations

from typing import Any

from .nodes.compose import DIPPGeneratorLoss, DIPPReferenceScore, DIPPReward, DIPPRewardCombine, DIPPTAModel
from .nodes.tiny_demo import DIPPTinyDemoModels, DIPPTinyFidelity, DIPPTinyTasteReward
from .nodes.tools import DIPPEvaluate, DIPPOneStepSample, DIPPSave
from .nodes.train import DIPPAlign, DIPPExportRun, DIPPTrain

DEFINITIONS: dict[str, type] = {
    "DIPPReferenceScore": DIPPReferenceScore,
    "DIPPTAModel": DIPPTAModel,
    "DIPPReward": DIPPReward,
    "DIPPRewardCombine": DIPPRewardCombine,
    "DIPPGeneratorLoss": DIPPGeneratorLoss,
    "DIPPTrain": DIPPTrain,
    "DIPPAlign": DIPPAlign,
    "DIPPExportRun": DIPPExportRun,
    "DIPPOneStepSample": DIPPOneStepSample,
    "DIPPSave": DIPPSave,
    "DIPPEvaluate": DIPPEvaluate,
    "DIPPTinyDemoModels": DIPPTinyDemoModels,
    "DIPPTinyTasteReward": DIPPTinyTasteReward,
    "DIPPTinyFidelity": DIPPTinyFidelity,
}

DISPLAY_NAMES = {
    "DIPPReferenceScore": "DI++ Reference Score",
    "DIPPTAModel": "DI++ TA Model",
    "DIPPReward": "DI++ Reward",
    "DIPPRewardCombine": "DI++ Reward Combine",
    "DIPPGeneratorLoss": "DI++ Generator Loss",
    "DIPPTrain": "DI++ Train",
    "DIPPAlign": "DI++ Align (one click)",
    "DIPPExportRun": "DI++ Export Run (cluster)",
    "DIPPOneStepSample": "DI++ One-Step Sample",
    "DIPPSave": "DI++ Save",
    "DIPPEvaluate": "DI++ Evaluate",
    "DIPPTinyDemoModels": "DI++ Tiny Demo Models",
    "DIPPTinyTasteReward": "DI++ Tiny Taste Reward",
    "DIPPTinyFidelity": "DI++ Tiny Fidelity",
}



def exports() -> dict[str, Any]:
    """What a pack's __init__ gives ComfyUI: inside ComfyUI only `comfy_entrypoint` (V3; ComfyUI reads the V1
    mappings first when a module has them), outside it the declarations as the classic mappings. An older
    ComfyUI gets an ImportError naming the version it needs, which ComfyUI shows in its log and load summary."""
    from .version import host_problem, inside_comfyui

    if not inside_comfyui():
        return {"NODE_CLASS_MAPPINGS": dict(DEFINITIONS), "NODE_DISPLAY_NAME_MAPPINGS": dict(DISPLAY_NAMES)}
    problem = host_problem()
    if problem is not None:
        raise ImportError(problem)
    from .paths import host_folders, register_rewards_folder
    from .v3 import DiffInstructExtension

    register_rewards_folder(host_folders())  # models/rewards, listed like ComfyUI's own model folders

    async def comfy_entrypoint() -> DiffInstructExtension:
        return DiffInstructExtension(DEFINITIONS, DISPLAY_NAMES)

    return {"comfy_entrypoint": comfy_entrypoint}


# the declarations under ComfyUI's classic names, for tools and tests that walk a pack without ComfyUI
NODE_CLASS_MAPPINGS = DEFINITIONS
NODE_DISPLAY_NAME_MAPPINGS = DISPLAY_NAMES

__all__ = ["DEFINITIONS", "DISPLAY_NAMES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "exports"]
