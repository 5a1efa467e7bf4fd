"""Using a trained generator: One-Step Sample, Save, Evaluate."""

from __future__ import annotations

import os
from typing import Any

import torch

from .common import CATEGORY, EVAL_PROMPTS_TOOLTIP, REWARD, WEIGHTS, seed_input, size_inputs


class DIPPOneStepSample:
    DESCRIPTION = ("Sample the one-step generator: x0 = D(sigma_init z, sigma_init, c), one network evaluation per "
                   "image. Works on an aligned MODEL (its sigma_init is recorded) or any supported MODEL "
                   "(sigma_init 2.5, or just under 1 for flow models).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "image")
    OUTPUT_TOOLTIPS = ("The samples as a LATENT (decode with VAE Decode).",
                       "The samples decoded with the VAE (a latent preview when no VAE is connected).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The generator (from Align / Train, or any supported MODEL)."}),
                "positive": ("CONDITIONING", {"tooltip": "Conditioning; several entries are used in turn."}),
                "seed": seed_input("Seed of the starting noise: the same seed gives the same images."),
                **size_inputs(),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Images to generate."}),
            },
            "optional": {"vae": ("VAE", {"tooltip": "Decodes the samples for the IMAGE output."})},
        }

    def sample(self, model: Any, positive: Any, seed: int, width: int, height: int, batch_size: int,
               vae: Any = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from diffinstruct.comfyui import host as host
        from diffinstruct.comfyui.training import one_step_sample

        downscale = host.vae_downscale(vae) if vae is not None else 8
        latent = one_step_sample(model, positive, seed, batch_size, width, height, downscale)
        if vae is None:
            flat = latent[:, :, 0] if latent.dim() == 5 else latent  # one frame of a video VAE's LATENT
            image = host.to_image(flat[:, :3].sigmoid())
        else:
            decoder = host.differentiable_decoder(vae)
            with torch.no_grad():
                image = host.to_image(decoder(latent.to(decoder.device)))
        return {"samples": latent}, image


class DIPPSave:
    DESCRIPTION = ("Save trained weights as .safetensors with their metadata (method, alpha, omega, steps, base "
                   "model). A LoRA goes to ComfyUI's loras folder and loads with the core Load LoRA node; full "
                   "weights go to diffusion_models (Load Diffusion Model). Written atomically.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The saved file.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "weights": (WEIGHTS, {"tooltip": "From Train or Align."}),
                "filename_prefix": ("STRING", {"default": "diffinstruct/aligned", "tooltip": "Relative name; a "
                                               "counter and .safetensors are appended."}),
            },
            "optional": {"folder": ("STRING", {"default": "", "tooltip": "Target folder, inside ComfyUI's output "
                                               "folder (a relative path lands there) or its loras / "
                                               "diffusion_models folders. Empty: the loras folder (LoRA) or the "
                                               "diffusion_models folder (full weights)."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str, folder: str = "") -> bool | str:  # noqa: N802 - ComfyUI's name
        """At queue time, on this node: a folder outside ComfyUI's folders is refused before anything runs."""
        from diffinstruct.comfyui.files import check_prefix
        from diffinstruct.comfyui.paths import node_write, refusal

        try:
            check_prefix(filename_prefix)
        except ValueError as exc:
            return str(exc)
        return refusal(node_write, folder.strip(), "folder") if folder.strip() else True

    def save(self, weights: Any, filename_prefix: str, folder: str = "") -> dict[str, Any]:
        from diffinstruct.comfyui.files import check_prefix, save_weights
        from diffinstruct.comfyui.paths import node_write

        target = folder.strip()
        if not target:
            try:
                import folder_paths
            except ImportError as exc:
                raise ValueError("no folder given and ComfyUI's folder_paths is not available: set 'folder'") from exc
            kind = "loras" if weights.kind == "lora" else "diffusion_models"
            target = folder_paths.get_folder_paths(kind)[0]
        base = node_write(target, "folder")
        node_write(base / check_prefix(filename_prefix), "filename_prefix")  # its subfolders may not link outside
        path = save_weights(weights, base, filename_prefix)
        return {"ui": {"text": [f"saved {os.fspath(path)}"], "path": [os.fspath(path)]}, "result": (os.fspath(path),)}


class DIPPEvaluate:
    DESCRIPTION = ("Reward statistics of a one-step generator over prompts (same noise for every model, so "
                   "before/after comparisons are paired): mean, standard deviation, per-prompt means and samples.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("mean", "std", "report", "images")
    OUTPUT_TOOLTIPS = ("Mean reward over all samples.", "Standard deviation of the reward.",
                       "A text report with per-prompt means.", "The scored samples.")
    FUNCTION = "evaluate"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The generator to evaluate (a base MODEL or an aligned one)."}),
            "clip": ("CLIP", {"tooltip": "Encodes the prompts."}),
            "vae": ("VAE", {"tooltip": "Decodes the samples for the reward."}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": EVAL_PROMPTS_TOOLTIP}),
            "reward": (REWARD, {"tooltip": "The reward to measure."}),
            "seed": seed_input("Seed of the starting noise: prompt i draws its samples from seed + i, the same for "
                               "every model, so before / after comparisons are paired."),
            "samples_per_prompt": ("INT", {"default": 4, "min": 1, "max": 1024, "tooltip": "Samples per prompt."}),
            **size_inputs(),
        }}

    def evaluate(self, model: Any, clip: Any, vae: Any, prompts: str, reward: Any, seed: int,
                 samples_per_prompt: int, width: int, height: int) -> dict[str, Any]:
        from diffinstruct.comfyui.training import evaluate

        ev = evaluate(model, clip, vae, prompts, reward, seed=seed, samples_per_prompt=samples_per_prompt,
                      width=width, height=height)
        report = ev.report()
        return {"ui": {"text": [report], "mean": [ev.mean], "std": [ev.std]},
                "result": (ev.mean, ev.std, report, ev.images)}
