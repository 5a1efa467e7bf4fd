"""Tiny random instances of every text-to-image family of the tested ComfyUI, saved and loaded the way users do.

For each family: the diffusion model is built through the family's own `comfy.supported_models` class (its
model_base class, its comfy/ldm network, its latent format and sampling) with shrunk widths and depths,
initialised with a fixed seed (ComfyUI's layers skip initialisation), written in the file layout the family's
real files have (a single-file checkpoint with the family's key prefix, or a diffusion-model-only file plus a
VAE file) and read back through ComfyUI's own loaders (comfy.sd.load_checkpoint_guess_config,
comfy.sd.load_diffusion_model, comfy.sd.VAE).

Two honest stand-ins, documented per family in FAMILIES (docs/FAMILIES.md has the table):

* Detection. ComfyUI recognises a family from the file's keys, and for most DiTs then hard-codes the full
  widths (Flux: hidden 3072, 24 heads, T5 width 4096; Lumina 2: 2304; PixArt: 1152; HiDream: all of it), or
  recognises SD1.5/SDXL by their full widths (model_channels 320, context_dim 768/2048). A tiny file cannot be
  loaded under those numbers, so `tiny_detection` lets ComfyUI's own detection run on the tiny file first
  (its verdict is recorded and tested), then hands the loader the family's class with the tiny config the file
  carries in its metadata. Everything after detection (dtype choice, get_model, load_model_weights,
  ModelPatcher, the checkpoint's VAE split) is ComfyUI's loader unchanged. SD1.5 and SDXL, which ComfyUI tells
  apart only by widths, are also detected at their real widths on the meta device (`full_size_verdict`).
  SD3 needs no shim: ComfyUI reads every width from the tiny file itself.
* Text encoders. ComfyUI builds every text encoder from a fixed full-size config (CLIP-L 123M parameters,
  T5-XXL 4.7B, Gemma 2 2B, Qwen2.5-VL 7B, Llama 3.1 8B), so no tiny encoder file loads through load_clip.
  SD1.5 uses the suite's tiny CLIP (ComfyUI's SD1ClipModel and SD1 tokenizer, tests/comfy_host/tiny_comfy.py);
  the other families use `StandInClip`: per-prompt seeded CONDITIONING with the shapes (at the tiny widths) and
  the extras keys the family's ComfyUI encoder returns, so ComfyUI's own conditioning path (extra_conds,
  CONDRegular, the samplers) sees what it sees with the real encoder.

The VAE is always TAESD with the family's latent channel count (4 or 16): a real comfy.sd.VAE, a stand-in
for the family's full AutoencoderKL (84M parameters) or, for Qwen-Image, the Wan 2.1 video VAE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiny_comfy
import torch

META_KEY = "diffinstruct.tiny_unet_config"
HEAD = 32  # attention head width of the tiny DiTs; rope axes below add up to it
AXES = [8, 12, 12]


@dataclass(frozen=True)
class Cond:
    """What the family's text encoder returns: cross-attention tokens x width, and the extras dict."""

    tokens: int
    width: int
    extras: dict[str, Any] = field(default_factory=dict)  # name -> shape (ints) or a constant
    encoder: str = ""  # the real encoder(s), for the notes


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # comfy.supported_models class
    tiny: dict[str, Any]
    layout: str  # "checkpoint" or "diffusion_model"
    prefix: str  # key prefix of the diffusion model in the file
    latent_channels: int
    cond: Cond | None  # None: the suite's tiny CLIP (ComfyUI's own encoder class)
    clip_type: str  # the CLIPType a user picks in Load CLIP for the real encoders
    tiny_detected: bool  # ComfyUI's detection of the tiny file names the family (else: full_widths)
    full_widths: dict[str, Any] = field(default_factory=dict)  # for the meta-device detection check
    vae_prefix: str = "first_stage_model."
    notes: str = ""
    latent_size: int = 8  # the smallest latent side the network runs at


def _flux(guidance: bool) -> dict[str, Any]:
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
            "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": AXES, "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance}


T5 = "T5-XXL (4096 wide)"
FLUX_COND = Cond(16, 64, {"pooled_output": (1, 32)}, "CLIP-L pooled (768) + " + T5)

FAMILIES: list[Family] = [
    Family("SD1.5", "SD15", dict(tiny_comfy.UNET_CONFIG), "checkpoint", "model.diffusion_model.", 4, None,
           "stable_diffusion", False,
           {"model_channels": 320, "context_dim": 768, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2] * 4,
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1,
                                                                                     1, 1, 1]},
           notes="text encoder: the suite's tiny CLIP through ComfyUI's SD1ClipModel and SD1 tokenizer"),
    Family("SDXL", "SDXL", dict(tiny_comfy.UNET_CONFIG, model_channels=64, context_dim=128, adm_in_channels=1600,
                                num_classes="sequential", use_linear_in_transformer=True),
           "checkpoint", "model.diffusion_model.", 4, Cond(77, 128, {"pooled_output": (1, 64)},
                                                         "CLIP-L + CLIP-G (2048 wide, pooled 1280)"),
           "sdxl", False,
           {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816, "channel_mult": [1, 2, 4],
            "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
           notes="adm_in_channels = pooled width + 6 x 256 size embeddings"),
    Family("SD3.5", "SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                            "adm_in_channels": 64, "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms",
                            "context_embedder_config": {"target": "torch.nn.Linear",
                                                        "params": {"in_features": 64, "out_features": 128}},
                            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []},
           "checkpoint", "model.diffusion_model.", 16,
           Cond(154, 64, {"pooled_output": (1, 64)}, "CLIP-L + CLIP-G + T5-XXL (4096 wide, pooled 2048)"),
           "sd3", True, notes="MMDiT width = 64 x depth, read from the file by ComfyUI"),
    Family("PixArt-alpha", "PixArtAlpha", {"image_model": "pixart_alpha", "patch_size": 2, "in_channels": 4,
                                           "hidden_size": 96, "depth": 1, "num_heads": 2, "caption_channels": 64,
                                           "model_max_length": 32, "micro_condition": True},
           "diffusion_model", "", 4, Cond(32, 64, {}, T5), "pixart", True, latent_size=48,
           notes="hidden divisible by 3 (size + aspect-ratio embeddings); ComfyUI hard-codes 1152"),
    Family("PixArt-sigma", "PixArtSigma", {"image_model": "pixart_sigma", "patch_size": 2, "in_channels": 4,
                                           "hidden_size": 64, "depth": 1, "num_heads": 2, "caption_channels": 64,
                                           "model_max_length": 32, "micro_condition": False},
           "diffusion_model", "", 4, Cond(32, 64, {}, T5), "pixart", True, latent_size=48,
           notes="PixArt's position embedding divides by round(latent side / 64): sides under 48 fail"),
    Family("Flux.1 dev", "Flux", _flux(True), "diffusion_model", "", 16,
           Cond(16, 64, {"pooled_output": (1, 32), "guidance": 3.5}, FLUX_COND.encoder), "flux", True,
           notes="guidance: what FluxGuidance puts in the conditioning"),
    Family("Flux.1 schnell", "FluxSchnell", _flux(False), "diffusion_model", "", 16, FLUX_COND, "flux", True),
    Family("Chroma", "Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
                                "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
                                "depth_single_blocks": 1, "axes_dim": AXES, "theta": 10000, "patch_size": 2,
                                "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1},
           "diffusion_model", "", 16, Cond(16, 64, {}, T5), "chroma", True),
    Family("Lumina 2", "Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                                   "cap_feat_dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2,
                                   "n_kv_heads": 1, "multiple_of": 16, "qk_norm": True, "axes_dims": AXES,
                                   "axes_lens": [300, 512, 512]},
           "diffusion_model", "", 16, Cond(16, 64, {"attention_mask": (1, 16)}, "Gemma 2 2B (2304 wide)"),
           "lumina2", True, notes="Z-Image's family"),
    Family("Qwen-Image", "QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                                       "out_channels": 16, "num_layers": 1, "attention_head_dim": HEAD,
                                       "num_attention_heads": 2, "joint_attention_dim": 64,
                                       "axes_dims_rope": AXES},
           "diffusion_model", "", 16, Cond(16, 64, {}, "Qwen2.5-VL 7B (3584 wide)"), "qwen_image", True,
           notes="ComfyUI drops the all-ones attention mask; real VAE is Wan 2.1's (3-D latents)"),
    Family("HiDream", "HiDream", {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                                  "num_layers": 1, "num_single_layers": 1, "attention_head_dim": HEAD,
                                  "num_attention_heads": 2, "caption_channels": [64, 64], "text_emb_dim": 64,
                                  "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8],
                                  "max_resolution": [16, 16], "llama_layers": [0, 1]},
           "diffusion_model", "", 16,
           Cond(16, 64, {"pooled_output": (1, 64), "conditioning_llama3": (1, 2, 16, 64)},
                "CLIP-L + CLIP-G pooled (2048) + T5-XXL + Llama 3.1 8B hidden states (4096)"),
           "hidream", True, notes="ComfyUI hard-codes every HiDream dimension"),
    Family("AuraFlow", "AuraFlow", {"max_seq": 64, "cond_seq_dim": 2048, "n_double_layers": 1, "n_layers": 2,
                                    "dim": 64, "n_heads": 2, "global_conddim": 64, "in_channels": 4,
                                    "out_channels": 4, "patch_size": 2},
           "checkpoint", "model.", 4, Cond(16, 2048, {}, "Pile T5-XL (2048 wide)"), "stable_diffusion", True,
           vae_prefix="vae.", notes="ComfyUI matches AuraFlow on the encoder width 2048, kept"),
    Family("HunyuanDiT 1.2", "HunyuanDiT", {"image_model": "hydit", "hidden_size": 64, "depth": 2, "num_heads": 2,
                                            "text_states_dim": 64, "text_states_dim_t5": 64, "text_len": 16,
                                            "text_len_t5": 16},
           "checkpoint", "model.diffusion_model.", 4,
           Cond(16, 64, {"pooled_output": (1, 64), "attention_mask": (1, 16), "conditioning_mt5xl": (1, 16, 64),
                         "attention_mask_mt5xl": (1, 16)}, "Chinese BERT CLIP (1024, 77) + mT5-XL (2048, 256)"),
           "hunyuan_dit", True, vae_prefix="vae.",
           notes="ComfyUI reads hidden and depth; the encoder widths and lengths (fixed at 1024/2048, 77/256: "
                 "33M parameters of projections) are shrunk too"),
]

BY_NAME = {f.name: f for f in FAMILIES}
#: families whose tiny file ComfyUI's loader takes with no shim at all
UNTOUCHED = {"SD3.5"}


# ============================================================================================== build
def config_of(family: Family, unet_config: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, family.config_class)(dict(unet_config or family.tiny))
    cfg.set_inference_dtype(dtype, None)
    return cfg


# buffers the networks create empty because real checkpoints carry them (SD3's position embedding, PixArt's null
# caption embedding): left so, a tiny file would hold whatever memory they got, and runs would differ
CHECKPOINT_BUFFERS = ("pos_embed", "y_embedding")


def build(family: Family, seed: int = 0) -> torch.nn.Module:
    """The family's model_base object (diffusion model inside), random weights from `seed`."""
    model = config_of(family).get_model({})
    tiny_comfy._init(model.diffusion_model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in sorted(model.diffusion_model.named_buffers()):
            if name.rpartition(".")[2] in CHECKPOINT_BUFFERS:
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.02)
    return model


def save(family: Family, model: torch.nn.Module, folder: Path, vae_seed: int = 0) -> dict[str, Path]:
    """Files as the family ships them: {"checkpoint": path} or {"diffusion_model": path, "vae": path}."""
    import comfy.utils

    folder.mkdir(parents=True, exist_ok=True)
    meta = {META_KEY: json.dumps(family.tiny)}
    unet = {family.prefix + k: v.detach().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    vae = taesd_state_dict(family.latent_channels, vae_seed)
    stem = family.name.lower().replace(" ", "_").replace(".", "")
    if family.layout == "checkpoint":
        path = folder / f"{stem}.safetensors"
        comfy.utils.save_torch_file({**unet, **{family.vae_prefix + k: v for k, v in vae.items()}}, str(path),
                                    metadata=meta)
        return {"checkpoint": path}
    paths = {"diffusion_model": folder / f"{stem}_dit.safetensors", "vae": folder / f"{stem}_vae.safetensors"}
    comfy.utils.save_torch_file(unet, str(paths["diffusion_model"]), metadata=meta)
    comfy.utils.save_torch_file(vae, str(paths["vae"]))
    return paths


def taesd_state_dict(latent_channels: int, seed: int) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    if latent_channels == 4:
        return tiny_comfy.tiny_vae(seed).first_stage_model.state_dict()
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    torch.manual_seed(seed)
    for m in taesd.modules():  # ComfyUI's layers skip init
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


# ============================================================================================== load
@contextlib.contextmanager
def tiny_detection(family: Family, verdicts: list[str | None]):
    """ComfyUI's detection runs on the tiny file first (its verdict goes to `verdicts`); the loader then gets the
    family's class over the tiny config the file carries, since ComfyUI would build the full-width network."""
    import comfy.model_detection

    original = comfy.model_detection.model_config_from_unet
    if family.name in UNTOUCHED:
        def spy(state_dict, prefix, *args, **kwargs):
            out = original(state_dict, prefix, *args, **kwargs)
            verdicts.append(type(out).__name__ if out is not None else None)
            return out
        replacement = spy
    else:
        def replacement(state_dict, prefix, *args, **kwargs):
            try:
                seen = original(state_dict, prefix, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a verdict like any other, reported
                seen = exc
            verdicts.append(type(seen).__name__ if seen is not None else None)
            cfg = config_of(family)
            cfg.unet_config.pop("dtype", None)  # the loader picks the dtype, as for a real file
            return cfg
    comfy.model_detection.model_config_from_unet = replacement
    try:
        yield
    finally:
        comfy.model_detection.model_config_from_unet = original


@dataclass
class Loaded:
    model: Any  # ModelPatcher
    vae: Any
    verdicts: list[str | None]


def load(family: Family, paths: dict[str, Path], model_options: dict[str, Any] | None = None) -> Loaded:
    """model_options: what the loader nodes pass (UNETLoader's weight_dtype becomes {"dtype": torch.float8_e4m3fn})."""
    import comfy.sd
    import comfy.utils

    verdicts: list[str | None] = []
    with tiny_detection(family, verdicts):
        if "checkpoint" in paths:
            model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(paths["checkpoint"]), output_vae=True,
                                                                     output_clip=False,
                                                                     model_options=model_options or {})
        else:
            model = comfy.sd.load_diffusion_model(str(paths["diffusion_model"]), model_options=model_options or {})
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["vae"])))
    return Loaded(model, vae, verdicts)


def full_size_verdict(family: Family) -> str | None:
    """ComfyUI's detection of the family's real widths (meta tensors: keys and shapes, no memory)."""
    import comfy.model_detection

    with torch.device("meta"):
        model = config_of(family, {**family.tiny, **family.full_widths}).get_model({}, device="meta")
    sd = {family.prefix + k: v for k, v in model.diffusion_model.state_dict().items()}
    found = comfy.model_detection.model_config_from_unet(sd, family.prefix)
    return type(found).__name__ if found is not None else None


class NotLoaded(logging.Handler):
    """Counts ComfyUI's "lora key not loaded" warnings (a LoRA key that matched no layer)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "lora key not loaded" in record.getMessage():
            self.count += 1


# ============================================================================================== text encoders
class StandInClip:
    """A CLIP's two methods the pack and CLIPTextEncode call; per-prompt seeded tensors of the family's encoder
    output shapes and extras (see the module docstring: the real encoders do not come tiny)."""

    def __init__(self, cond: Cond, seed: int = 0) -> None:
        self.cond, self.seed = cond, seed

    def tokenize(self, text: str, **kwargs: Any) -> dict[str, str]:
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens: dict[str, str], **kwargs: Any) -> list[list[Any]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(tokens["text"].encode()))
        cross = torch.randn((1, self.cond.tokens, self.cond.width), generator=gen)
        extras: dict[str, Any] = {"pooled_output": None}  # CLIP.encode_from_tokens always sets the key
        for key, spec in self.cond.extras.items():
            if isinstance(spec, tuple) and key.startswith("attention_mask"):
                extras[key] = torch.ones(spec, dtype=torch.long)  # token-id dtype, as ComfyUI's encoders
            elif isinstance(spec, tuple):
                extras[key] = torch.randn(spec, generator=gen)
            else:
                extras[key] = spec
        return [[cross, extras]]


def clip_for(family: Family, seed: int = 0) -> Any:
    return tiny_comfy.tiny_clip(seed) if family.cond is None else StandInClip(family.cond, seed)


def conditioning(clip: Any, text: str) -> list[list[Any]]:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model: Any, positive: Any, negative: Any, channels: int, steps: int = 2, cfg: float = 2.0,
           size: int = 8, seed: int = 0) -> torch.Tensor:
    """A KSampler run (comfy.sample.sample: conditioning through the model's extra_conds, CFG, Euler)."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros((1, channels, size, size)))  # as KSampler
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)
