"""Shared pieces of the node pack: the category, socket type names and small input helpers.

Nodes are classic (V1) ComfyUI classes that import without ComfyUI; everything host-specific lives in
`diffinstruct.comfyui.host*` and imports `comfy` only while a node executes.
"""

from __future__ import annotations

from typing import Any

CATEGORY = "Diff-Instruct++"
REFERENCE = "DIPP_REFERENCE"
TA = "DIPP_TA"
REWARD = "DIPP_REWARD"
LOSS = "DIPP_LOSS"
WEIGHTS = "DIPP_WEIGHTS"

PROMPTS_TOOLTIP = "Training prompts, one per line (blank lines and lines starting with # are skipped)."
EVAL_PROMPTS_TOOLTIP = ("Prompts to evaluate, one per line (blank lines and lines starting with # are skipped); "
                        "samples_per_prompt images each, in this order.")
ALPHA_TOOLTIP = ("Reward scale alpha (0 = no reward). It weighs the reward gradient against the normalised "
                 "distillation direction; the DI++ paper used 0-1000 for SD1.5.")
OMEGA_TOOLTIP = ("CFG scale omega of the reference score (1 = no guidance). Guidance-distilled models (Flux.1 "
                 "dev) take their guidance from the conditioning (FluxGuidance) instead: keep 1 for them.")


def size_inputs(default: int = 512) -> dict[str, Any]:
    return {
        "width": ("INT", {"default": default, "min": 8, "max": 4096, "step": 8,
                          "tooltip": "Image width in pixels (a multiple of the VAE's downscale, usually 8)."}),
        "height": ("INT", {"default": default, "min": 8, "max": 4096, "step": 8,
                           "tooltip": "Image height in pixels (a multiple of the VAE's downscale, usually 8)."}),
    }


TRAIN_SEED_TOOLTIP = "Seed of every random draw (noise, sigmas, prompt order): equal seeds give equal runs."


def seed_input(tooltip: str = TRAIN_SEED_TOOLTIP) -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": tooltip})


def default_run_dir(kind: str, prompt: dict[str, Any] | None = None, node_id: str | None = None) -> str:
    """The run folder for an empty checkpoint_dir: named after the queued run, so re-queueing resumes it."""
    from diffinstruct.comfyui.runs import default_run_dir as named

    return named(kind, prompt, node_id)


def always_run(**_: Any) -> float:
    """IS_CHANGED for training nodes: NaN never equals itself, so a new run is never a cached result."""
    return float("nan")
