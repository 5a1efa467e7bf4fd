"""Training nodes: Train (from a composed Generator Loss) and Align (one click, the paper's defaults)."""

from __future__ import annotations

import json
from typing import Any

from diffinstruct.comfyui.live import LiveSettings
from diffinstruct.comfyui.paths import node_write
from diffinstruct.comfyui.specs import MAX_ALPHA, MAX_OMEGA, LossSpec, ReferenceSpec, RewardSpec, TASpec
from diffinstruct.errors import PathNotAllowed

from .common import (
    ALPHA_TOOLTIP,
    CATEGORY,
    LOSS,
    OMEGA_TOOLTIP,
    PROMPTS_TOOLTIP,
    REWARD,
    WEIGHTS,
    always_run,
    default_run_dir,
    seed_input,
    size_inputs,
)

OUTPUTS = ("MODEL", WEIGHTS, "IMAGE", "IMAGE", "STRING")
OUTPUT_NAMES = ("model", "weights", "curves", "preview", "summary")
OUTPUT_TOOLTIPS = (
    "The aligned one-step generator (sample it with One-Step Sample).",
    "The trained LoRA (ComfyUI's LoRA format) or full weights, for Save.",
    "Loss and reward curves over the steps.",
    "One-step samples of the aligned generator.",
    "The run's summary (JSON): first and last reward, checkpoint folder, timing.",
)


EMA_TOOLTIP = ("Decay of the generator weights' moving average (the MODEL and weights the run returns are "
               "the average). 0.95 is the paper's; a run of hundreds of steps at a small learning rate can use "
               "0.99 (the tiny demo does), which a run of tens of steps cannot (0.99 over 60 steps still weighs "
               "the start by 0.55).")
TA_LR_TOOLTIP = ("Adam learning rate of the TA, 10x the generator's by default: the TA must keep up with the "
                 "generator's samples, or the distillation direction goes stale and samples of one prompt drift "
                 "together (the tiny demo at alpha 10: 98 % of the teacher's diversity with the TA at 10x, 84 % "
                 "at 5x).")
EMA_DECAY = ("FLOAT", {"default": 0.95, "min": 0.0, "max": 0.9999, "step": 0.001, "round": False,
                       "tooltip": EMA_TOOLTIP})
CHECKPOINTING = ("BOOLEAN", {"default": False, "tooltip": "Recompute each block of the networks in backward "
                             "instead of keeping its activations: far less memory (at 1024 px Flux holds ~35 GiB of "
                             "activations, checkpointed only its blocks' inputs), for about one more forward pass "
                             "of time. The same training up to float rounding; a run resumes with it on or off."})
BF16 = ("BOOLEAN", {"default": False, "tooltip": "Train under bf16 autocast: the networks compute in bf16 (faster "
                    "on GPUs with bf16 tensor cores, smaller activations); trainable weights and the optimiser stay "
                    "float32, and frozen float32 weights are kept in bf16, the values autocast would use anyway."})
STEPS = ("INT", {"default": 200, "min": 1, "max": 1_000_000,
                 "tooltip": "Training steps (in total, counting the steps resumed from the checkpoint folder)."})


def _common_inputs() -> dict[str, Any]:
    return {
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Samples per step."}),
        "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                    "tooltip": "Adam learning rate of the generator."}),
        "seed": seed_input(),
        **size_inputs(),
        "checkpoint_dir": ("STRING", {"default": "", "tooltip": "Folder for the run's checkpoints; an existing "
                                      "run there is resumed. Inside ComfyUI's output folder (a relative path lands "
                                      "there) or its loras / diffusion_models folders. Empty: "
                                      "output/diffinstruct_runs/<a name made from this run's inputs>, so queueing "
                                      "the same workflow again (after Cancel, or with more steps) resumes it."}),
        "checkpoint_every": ("INT", {"default": 50, "min": 1, "max": 1_000_000,
                                     "tooltip": "Checkpoint every that many steps (and at the end, and on Cancel)."}),
    }


def _composed_inputs(model_note: str, vae_tooltip: str) -> dict[str, Any]:
    """What Train and Export Run take from a composed graph: the generator's start, the loss, the VAE, prompts."""
    return {
        "model": ("MODEL", {"tooltip": f"The generator's starting point (usually the reference's MODEL){model_note}."}),
        "loss": (LOSS, {"tooltip": "From Generator Loss."}),
        "vae": ("VAE", {"tooltip": vae_tooltip}),
        "prompts": ("STRING", {"multiline": True, "default": "",
                               "tooltip": PROMPTS_TOOLTIP + " Empty: train on the reference score's positive "
                                          "conditioning."}),
        "steps": STEPS,
    }


def _live_inputs() -> dict[str, Any]:
    return {
        "preview_every": ("INT", {"default": 10, "min": 0, "max": 1_000_000, "tooltip": "Every that many steps, "
                                  "show one-step samples and the reward, diversity and distance curves on this node "
                                  "(0: only at the end)."}),
        "diversity_warning": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Warn on "
                                        "the node when the samples' diversity falls below this fraction of the "
                                        "reference's (every sample of a prompt alike: reward hacking). 0: never."}),
    }


def _live(preview_every: int, diversity_warning: float) -> LiveSettings:
    return LiveSettings(every=preview_every, warn_fraction=diversity_warning)


def check_folder(checkpoint_dir: str) -> bool | str:
    """At queue time, on the training node: a checkpoint_dir outside ComfyUI's folders, or one that is a file, is
    named before any work."""
    text = checkpoint_dir.strip() if checkpoint_dir else ""
    if not text:
        return True
    try:
        path = node_write(text, "checkpoint_dir")
    except PathNotAllowed as exc:
        return str(exc)
    if path.exists() and not path.is_dir():
        return f"checkpoint_dir {path} exists and is not a folder"
    return True


def run_folder(kind: str, checkpoint_dir: str, prompt: dict[str, Any] | None, unique_id: str | None) -> str:
    """The run's folder: checkpoint_dir (confined to ComfyUI's folders inside ComfyUI; relative ones land in its
    output folder), or one named after the queued run when it is empty."""
    text = checkpoint_dir.strip()
    return str(node_write(text, "checkpoint_dir")) if text else default_run_dir(kind, prompt, unique_id)


def _outputs(result: Any) -> dict[str, Any]:
    """The outputs, and the numbers and paths the node shows on the canvas (docs/COMFYUI.md section 10)."""
    return {"ui": result.ui(), "result": (result.model, result.weights, result.curves, result.preview,
                                          json.dumps(result.summary, default=str, sort_keys=True))}


class _TrainingNode:
    """What Train and Align share: their outputs, a run that is never a cached result, the checkpoint_dir check."""

    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    TRAINS = True  # never a cached result (V3: fingerprint_inputs)

    @classmethod
    def IS_CHANGED(cls, **inputs: Any) -> float:
        return always_run(**inputs)

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint_dir: str = "") -> bool | str:  # noqa: N802 - ComfyUI's name
        return check_folder(checkpoint_dir)


class DIPPTrain(_TrainingNode):
    DESCRIPTION = ("Train a one-step generator with a composed Generator Loss. Progress shows every step; Cancel "
                   "stops between steps after writing a checkpoint; re-queueing with the same checkpoint folder "
                   "resumes the run.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                **_composed_inputs("", "Decodes samples for the reward and the preview."),
                **_common_inputs(),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Resume a run found in checkpoint_dir (off: "
                                                                   "refuse to touch it)."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "Encodes the prompts (needed when prompts are given)."}),
                         **_live_inputs(),
                         # last: a saved workflow's widget values are positional, and older ones end before them
                         "ema_decay": EMA_DECAY, "gradient_checkpointing": CHECKPOINTING, "bf16": BF16},
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    def train(self, model: Any, loss: LossSpec, vae: Any, prompts: str, steps: int, batch_size: int,
              learning_rate: float, seed: int, width: int, height: int, checkpoint_dir: str, checkpoint_every: int,
              resume: bool, clip: Any = None, ema_decay: float = 0.95, preview_every: int = 10,
              diversity_warning: float = 0.5, gradient_checkpointing: bool = False, bf16: bool = False,
              unique_id: str | None = None, prompt: dict[str, Any] | None = None) -> dict[str, Any]:
        from diffinstruct.comfyui import training as comfy_train
        from diffinstruct.comfyui.host import parse_prompts

        prompt_list = parse_prompts(prompts) if prompts.strip() else None
        folder = run_folder("train", checkpoint_dir, prompt, unique_id)
        opts = comfy_train.TrainOptions(steps=steps, checkpoint_dir=folder, ema_decay=ema_decay,
                                        batch_size=batch_size, lr_generator=learning_rate, seed=seed, width=width,
                                        height=height, checkpoint_every=checkpoint_every, resume=resume,
                                        gradient_checkpointing=gradient_checkpointing, bf16=bf16,
                                        node_id=unique_id, live=_live(preview_every, diversity_warning))
        return _outputs(comfy_train.train(loss, model, opts, vae=vae, prompts=prompt_list, clip=clip))


class DIPPAlign(_TrainingNode):
    DESCRIPTION = ("One-click DI++ alignment of a loaded checkpoint: MODEL + CLIP + VAE + prompts + a reward. "
                   "Everything else is at the paper's defaults (log-normal sigma (-2, 2), normalised weighting, "
                   "Adam (0, 0.999), EMA 0.95, sigma_init 2.5), with the TA and generator as LoRA adapters on one "
                   "shared frozen base; the TA learns 10x faster than the generator (ta_learning_rate).")
    FUNCTION = "align"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The loaded diffusion model to align."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder."}),
                "vae": ("VAE", {"tooltip": "Its VAE (decodes samples for the reward)."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": PROMPTS_TOOLTIP}),
                "reward": (REWARD, {"tooltip": "What to increase (from a Reward node)."}),
                "alpha": ("FLOAT", {"default": 10.0, "min": 0.0, "max": MAX_ALPHA, "step": 0.1,
                                    "tooltip": ALPHA_TOOLTIP}),
                "omega": ("FLOAT", {"default": 1.0, "min": 1.0, "max": MAX_OMEGA, "step": 0.1,
                                    "tooltip": OMEGA_TOOLTIP}),
                "steps": STEPS,
            },
            "optional": {
                "negative_prompt": ("STRING", {"default": "", "tooltip": "CFG's unconditional prompt (default "
                                                                         "empty)."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": "LoRA rank of the generator and "
                                                                                "the TA."}),
                "ta_learning_rate": ("FLOAT", {"default": 1e-3, "min": 0.0, "max": 1.0, "step": 1e-6,
                                               "round": False, "tooltip": TA_LR_TOOLTIP}),
                **_common_inputs(),
                **_live_inputs(),
                # last: saved workflows' widget values are positional
                "gradient_checkpointing": CHECKPOINTING, "bf16": BF16,
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    def align(self, model: Any, clip: Any, vae: Any, prompts: str, reward: RewardSpec, alpha: float, omega: float,
              steps: int, negative_prompt: str = "", rank: int = 8, ta_learning_rate: float = 1e-3,
              batch_size: int = 1, learning_rate: float = 1e-4, seed: int = 0, width: int = 512, height: int = 512,
              checkpoint_dir: str = "", checkpoint_every: int = 50, preview_every: int = 10,
              diversity_warning: float = 0.5, gradient_checkpointing: bool = False, bf16: bool = False,
              unique_id: str | None = None, prompt: dict[str, Any] | None = None) -> dict[str, Any]:
        from diffinstruct.comfyui import training as comfy_train
        from diffinstruct.comfyui.host import encode_prompts, parse_prompts

        prompt_list = parse_prompts(prompts)
        negative = [encode_prompts(clip, [negative_prompt])[negative_prompt]]
        reference = ReferenceSpec(model, None, negative, omega)
        loss = LossSpec(reference, TASpec("lora", rank, ta_learning_rate), reward, alpha)
        folder = run_folder("align", checkpoint_dir, prompt, unique_id)
        opts = comfy_train.TrainOptions(steps=steps, checkpoint_dir=folder,
                                        batch_size=batch_size, lr_generator=learning_rate, seed=seed, width=width,
                                        height=height, checkpoint_every=checkpoint_every,
                                        gradient_checkpointing=gradient_checkpointing, bf16=bf16,
                                        node_id=unique_id, live=_live(preview_every, diversity_warning))
        return _outputs(comfy_train.train(loss, model, opts, vae=vae, prompts=prompt_list, clip=clip))


class DIPPExportRun:
    DESCRIPTION = ("Export this composed run for a cluster: the nodes upstream of model, loss, VAE and CLIP (in "
                   "ComfyUI's API format) and the training settings, as a run config. `python -m "
                   "torch.distributed.run --nproc_per_node N -m diffinstruct comfyui train --config FILE --comfyui "
                   "ComfyUI --out models/loras/NAME` trains it data-parallel on N GPUs (or CPU processes); the "
                   "LoRA it saves loads with core Load LoRA. Nothing is trained here.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The run config written (JSON).",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        common = _common_inputs()
        common.pop("checkpoint_dir")
        return {
            "required": {
                **_composed_inputs(", from a loader", "Decodes samples for the reward."),
                **common,
                "filename_prefix": ("STRING", {"default": "diffinstruct/cluster_run", "tooltip": "Relative name "
                                               "of the run config (under output/diffinstruct_runs/) and of the "
                                               "weights the cluster run saves in --out."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "Encodes the prompts (needed when prompts are given)."}),
                         "ema_decay": EMA_DECAY, "gradient_checkpointing": CHECKPOINTING, "bf16": BF16},
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str) -> bool | str:  # noqa: N802 - ComfyUI's name
        from diffinstruct.comfyui.files import check_prefix

        try:
            check_prefix(filename_prefix)
        except ValueError as exc:
            return str(exc)
        return True

    def export(self, model: Any, loss: LossSpec, vae: Any, prompts: str, steps: int, batch_size: int,
               learning_rate: float, seed: int, width: int, height: int, checkpoint_every: int,
               filename_prefix: str, clip: Any = None, ema_decay: float = 0.95, gradient_checkpointing: bool = False,
               bf16: bool = False, unique_id: str | None = None,
               prompt: dict[str, Any] | None = None) -> dict[str, Any]:
        from pathlib import Path

        from diffinstruct.comfyui import cluster
        from diffinstruct.comfyui.files import check_prefix
        from diffinstruct.comfyui.paths import node_write
        from diffinstruct.comfyui.runs import runs_root

        settings = {"prompts": prompts, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                    "seed": seed, "width": width, "height": height, "checkpoint_every": checkpoint_every,
                    "ema_decay": ema_decay, "gradient_checkpointing": gradient_checkpointing, "bf16": bf16,
                    "filename_prefix": check_prefix(filename_prefix)}
        config = cluster.export_config(prompt, unique_id, settings)
        target = node_write(Path(runs_root()) / f"{check_prefix(filename_prefix)}.json", "filename_prefix")
        path = cluster.write_config(config, target)
        run = ("python -m torch.distributed.run --nproc_per_node N -m diffinstruct comfyui train "
               f"--config {path} --comfyui <ComfyUI folder> --out <ComfyUI>/models/loras/<name>")
        return {"ui": {"text": [f"saved {path}", f"{len(config['graph'])} nodes exported", run], "path": [str(path)]},
                "result": (str(path),)}
