"""The graph pieces of a DI++ objective: reference score, TA model, rewards, generator loss."""

from __future__ import annotations

from typing import Any

from diffinstruct.comfyui.paths import AUTO, reward_choices
from diffinstruct.comfyui.specs import (
    MAX_ALPHA,
    MAX_OMEGA,
    METHOD_LABELS,
    TA_MODES,
    WEIGHTINGS,
    LossSpec,
    ReferenceSpec,
    RewardSpec,
    RewardTerm,
    TASpec,
)
from diffinstruct.rewards.registry import NAMES as REWARD_NAMES

from .common import ALPHA_TOOLTIP, CATEGORY, LOSS, OMEGA_TOOLTIP, REFERENCE, REWARD, TA

REWARD_WEIGHTS_TOOLTIP = ("Model rewards: the weights, from ComfyUI's models/rewards folder (and any `rewards` "
                          "folder extra_model_paths.yaml adds). auto: models/rewards/<reward>/ (e.g. "
                          "models/rewards/imagereward/). Built-in rewards need none.")


class DIPPReferenceScore:
    DESCRIPTION = ("The reference (teacher) score of DI++: a diffusion MODEL with positive and negative "
                   "conditioning and CFG scale omega. The negative conditioning is CFG's unconditional branch.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REFERENCE,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("The reference score, for Generator Loss.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The pretrained diffusion model (SD1.5, SDXL, SD3.5, PixArt, Flux.1, "
                                           "Chroma, Lumina 2, Qwen-Image, HiDream, AuraFlow, HunyuanDiT)."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning; used as the training conditioning "
                                                     "when Train gets no prompts."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning: the unconditional branch of CFG."}),
            "omega": ("FLOAT", {"default": 1.0, "min": 1.0, "max": MAX_OMEGA, "step": 0.1, "tooltip": OMEGA_TOOLTIP}),
        }}

    def build(self, model: Any, positive: Any, negative: Any, omega: float) -> tuple[ReferenceSpec]:
        from diffinstruct.comfyui.host import conditioning_entries, model_family

        model_family(model)  # unsupported model types fail here, in the node the user connected them to
        conditioning_entries(positive, "positive conditioning")
        conditioning_entries(negative, "negative conditioning")
        return (ReferenceSpec(model, positive, negative, omega),)


class DIPPTAModel:
    DESCRIPTION = ("The TA (fake-score) network that tracks the generator's distribution. 'lora': LoRA adapters "
                   "on one shared frozen copy of the MODEL (generator and TA switch adapters; about 1x memory). "
                   "'full': trainable full copies (about 3x memory).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (TA,)
    RETURN_NAMES = ("ta",)
    OUTPUT_TOOLTIPS = ("The TA settings, for Generator Loss.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the TA starts from: the reference score's MODEL. In full "
                                           "mode, a Train whose generator MODEL comes from an earlier full-mode "
                                           "Train starts its TA from that run's TA instead (it already models "
                                           "that generator's samples)."}),
            "mode": (list(TA_MODES), {"default": "lora", "tooltip": "lora: shared frozen base with LoRA "
                                                                    "adapters; full: full trainable copies."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 1024, "tooltip": "LoRA rank (lora mode)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                        "tooltip": "Adam learning rate of the TA (the paper used 5e-6 for full "
                                                   "weights; LoRA needs more). Keep it above the generator's: "
                                                   "a TA that lags the generator's samples costs diversity (the "
                                                   "tiny demo and Align use 10x)."}),
        }}

    def build(self, model: Any, mode: str, rank: int, learning_rate: float) -> tuple[TASpec]:
        from diffinstruct.comfyui.host import model_family

        model_family(model)
        return (TASpec(mode, rank, learning_rate, model=model),)


class DIPPReward:
    DESCRIPTION = ("A reward: the built-ins (brightness, saturation, color_match; no weights) or a model reward "
                   "(ImageReward, PickScore, HPS, aesthetic, CLIP score, preference) read from local files only.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REWARD,)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The reward, for Generator Loss, Align, Evaluate or Reward Combine.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "reward": (list(REWARD_NAMES), {"default": "brightness" if "brightness" in REWARD_NAMES else None,
                                            "tooltip": "Which reward."}),
            "weight": ("FLOAT", {"default": 1.0, "min": -1e6, "max": 1e6, "step": 0.01,
                                 "tooltip": "Multiplies the reward (negative penalises it)."}),
            "weights_path": (reward_choices(), {"default": AUTO, "tooltip": REWARD_WEIGHTS_TOOLTIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, reward: str, weights_path: str) -> bool | str:  # noqa: N802 - ComfyUI's name
        """At queue time, on this node: a model reward whose weights are not installed is named before any work."""
        from diffinstruct.errors import UsageError

        try:
            path = _weights(reward, weights_path)
            RewardSpec([RewardTerm(1.0, reward, path)])  # an explicit path exists
        except (UsageError, OSError, ValueError) as exc:
            return str(exc)
        return True

    def build(self, reward: str, weight: float, weights_path: str = AUTO) -> tuple[RewardSpec]:
        return (RewardSpec([RewardTerm(weight, reward, _weights(reward, weights_path))]),)


def _weights(reward: str, weights_path: str) -> str | None:
    """The weights to load (None: the reward's own folder), checked to be installed and, inside ComfyUI, to lie in
    its model folders (the list the node offers)."""
    from diffinstruct.comfyui.host import models_dir
    from diffinstruct.comfyui.paths import reward_weights
    from diffinstruct.comfyui.specs import check_reward_weights

    path = reward_weights(weights_path)
    check_reward_weights(reward, path, models_dir())
    return path


class DIPPRewardCombine:
    DESCRIPTION = "A weighted sum of two rewards: weight_a * a + weight_b * b (chain nodes for more)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (REWARD,)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The combined reward.",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "reward_a": (REWARD, {"tooltip": "First reward."}),
            "weight_a": ("FLOAT", {"default": 1.0, "min": -1e6, "max": 1e6, "step": 0.01, "tooltip": "Its weight."}),
            "reward_b": (REWARD, {"tooltip": "Second reward."}),
            "weight_b": ("FLOAT", {"default": 1.0, "min": -1e6, "max": 1e6, "step": 0.01, "tooltip": "Its weight."}),
        }}

    def combine(self, reward_a: RewardSpec, weight_a: float, reward_b: RewardSpec,
                weight_b: float) -> tuple[RewardSpec]:
        return (reward_a.combined(reward_b, weight_a, weight_b),)


class DIPPGeneratorLoss:
    DESCRIPTION = ("The generator objective: DI++ (distillation + alpha * reward), DI (pure distillation, "
                   "alpha = 0) or DI* (pseudo-Huber score divergence + alpha * reward), with its weighting and "
                   "the log-normal noise-level distribution ln(sigma) ~ N(P_mean, P_std^2).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("The generator loss, for Train.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "reference": (REFERENCE, {"tooltip": "From Reference Score."}),
                "ta": (TA, {"tooltip": "From TA Model."}),
                "alpha": ("FLOAT", {"default": 10.0, "min": 0.0, "max": MAX_ALPHA, "step": 0.1,
                                    "tooltip": ALPHA_TOOLTIP}),
                "method": (list(METHOD_LABELS), {"default": "DI++", "tooltip": "DI++, DI (no reward) or DI*."}),
                "weighting": (list(WEIGHTINGS), {"default": "normalized", "tooltip": "normalized: divide the "
                                                 "distillation direction by its mean size per sample (default); "
                                                 "unit: no weighting."}),
                "p_mean": ("FLOAT", {"default": -2.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                     "tooltip": "Mean of ln(sigma) (paper: -2.0)."}),
                "p_std": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                    "tooltip": "Standard deviation of ln(sigma) (paper: 2.0)."}),
            },
            "optional": {"reward": (REWARD, {"tooltip": "The reward (needed when alpha > 0)."})},
        }

    def build(self, reference: ReferenceSpec, ta: TASpec, alpha: float, method: str, weighting: str, p_mean: float,
              p_std: float, reward: RewardSpec | None = None) -> tuple[LossSpec]:
        from diffinstruct.comfyui.training import same_model
        from diffinstruct.errors import ConfigError

        if ta.model is not None and not same_model(ta.model, reference.model):
            raise ConfigError("the TA starts from the reference score's MODEL: connect the same MODEL to "
                              "Reference Score and TA Model")
        return (LossSpec(reference, ta, reward, alpha, method, weighting, p_mean, p_std),)
