"""The built-in tiny text-to-image demo (`make demo`) in the graph: its models and its learned reward."""

from __future__ import annotations

import json
from typing import Any

from diffinstruct.comfyui.specs import RewardSpec, RewardTerm

from .common import CATEGORY, EVAL_PROMPTS_TOOLTIP, REWARD, default_run_dir, seed_input


class DIPPTinyDemoModels:
    DESCRIPTION = ("The package's built-in tiny text-to-image problem (the models of `make demo`, shipped with the "
                   "package, no download): a 16x16 RGB pixel-space teacher of coloured shapes, its text encoder "
                   "(prompts like 'a large red circle at the top left'; the empty prompt is the unconditional one) "
                   "and a pixel-space VAE. Use width = height = 16.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The tiny teacher (an EDM denoiser on pixels), for the pack's nodes.",
                       "Its prompt encoder: the tiny vocabulary (a at the, small large, red green blue yellow, "
                       "circle square triangle, top bottom left right); works with CLIP Text Encode.",
                       "Pixel space: decoding maps [-1, 1] to [0, 1] images (downscale 1).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}, "optional": {
            "weights_folder": ("STRING", {"default": "", "tooltip": "A folder with teacher.safetensors, in one of "
                                          "ComfyUI's model folders (diffusion_models, checkpoints, loras, rewards). "
                                          "Empty: the weights shipped with the package."}),
        }}

    def load(self, weights_folder: str = "") -> tuple[Any, Any, Any]:
        from diffinstruct.comfyui.paths import node_read
        from diffinstruct.comfyui.tiny_models import demo_models

        folder = weights_folder.strip()
        return demo_models(str(node_read(folder, "weights_folder")) if folder else None)

    @classmethod
    def VALIDATE_INPUTS(cls, weights_folder: str = "") -> bool | str:  # noqa: N802 - ComfyUI's name
        from diffinstruct.comfyui.paths import node_read, refusal

        return refusal(node_read, weights_folder.strip(), "weights_folder") if weights_folder.strip() else True


class DIPPTinyTasteReward:
    DESCRIPTION = ("Stage 2 of the tiny demo, reward modelling: a simulated rater with a hidden taste (darker "
                   "backgrounds) chooses between pairs of images (data images and the generator's samples); a "
                   "Bradley-Terry preference model learns a differentiable reward from those choices alone. "
                   "The model is saved as .safetensors (written atomically) and used as the 'preference' reward.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REWARD, "STRING", "STRING")
    RETURN_NAMES = ("reward", "path", "report")
    OUTPUT_TOOLTIPS = ("The learned reward, for Generator Loss and Evaluate.",
                       "The saved preference model.",
                       "The fit's record (JSON): held-out accuracy and agreement with the hidden taste.")
    FUNCTION = "fit"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("INT", {"default": 256, "min": 4, "max": 100_000, "tooltip": "Images the rater sees "
                                   "(half data images, half generator samples when a generator is connected)."}),
                "pairs": ("INT", {"default": 1500, "min": 16, "max": 1_000_000, "tooltip": "Rated pairs."}),
                "epochs": ("INT", {"default": 40, "min": 1, "max": 10_000, "tooltip": "Training epochs of the "
                                                                                      "preference model."}),
                "seed": seed_input("Seed of the images shown, the pairs, the rater's choices and the fit: equal "
                                   "seeds give equal rewards."),
            },
            "optional": {
                "generator": ("MODEL", {"tooltip": "The stage-1 generator (from Train): its samples are rated too, "
                                                   "so the reward knows the images it will judge."}),
                "folder": ("STRING", {"default": "", "tooltip": "Where to save the model, inside ComfyUI's output "
                                                                "folder (a relative path lands there). Empty: a new "
                                                                "folder in the output folder."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, folder: str = "") -> bool | str:  # noqa: N802 - ComfyUI's name
        from diffinstruct.comfyui.paths import node_write, refusal

        return refusal(node_write, folder.strip(), "folder") if folder.strip() else True

    def fit(self, images: int, pairs: int, epochs: int, seed: int, generator: Any = None,
            folder: str = "") -> dict[str, Any]:
        from diffinstruct.comfyui.paths import node_write
        from diffinstruct.comfyui.tiny_models import fit_taste_reward

        target = str(node_write(folder.strip(), "folder")) if folder.strip() else default_run_dir("taste")
        path, record = fit_taste_reward(generator, target, images=images,
                                        pairs=pairs, epochs=epochs, seed=seed)
        report = json.dumps(record, sort_keys=True)
        spec = RewardSpec([RewardTerm(1.0, "preference", str(path))])
        shown = [f"{k.replace('_', ' ')}: {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')}: {v}"
                 for k, v in sorted(record.items()) if isinstance(v, int | float | str)]
        return {"ui": {"text": ["\n".join([*shown, f"saved {path}"])], "record": [report]},
                "result": (spec, str(path), report)}


class DIPPTinyFidelity:
    DESCRIPTION = ("Prompt fidelity of tiny-demo images (as `make demo` reports it): the shipped attribute "
                   "classifier reads each image's colour, shape, size and position and compares them with its "
                   "prompt. Connect Evaluate's images with the same prompts and samples per prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("attribute_accuracy", "prompt_accuracy", "report")
    OUTPUT_TOOLTIPS = ("Percentage of attributes read as the prompt asked.",
                       "Percentage of images with all four attributes right.",
                       "The accuracies per attribute, as text.")
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "images": ("IMAGE", {"tooltip": "16x16 images, samples_per_prompt per prompt in prompt order (what "
                                            "Evaluate outputs)."}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": EVAL_PROMPTS_TOOLTIP}),
            "samples_per_prompt": ("INT", {"default": 4, "min": 1, "max": 1024,
                                           "tooltip": "Images per prompt (Evaluate's samples_per_prompt)."}),
        }}

    def measure(self, images: Any, prompts: str, samples_per_prompt: int) -> dict[str, Any]:
        from diffinstruct.comfyui.tiny_models import fidelity

        scores = fidelity(images, prompts, samples_per_prompt)
        report = "  ".join(f"{k} {v:.1f}%" for k, v in scores.items())
        return {"ui": {"text": [report], "attribute_accuracy": [scores["attribute_accuracy"]],
                       "prompt_accuracy": [scores["prompt_accuracy"]]},
                "result": (scores["attribute_accuracy"], scores["prompt_accuracy"], report)}
