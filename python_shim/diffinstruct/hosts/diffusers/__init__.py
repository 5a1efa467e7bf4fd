"""diffusers models as the engine's denoisers D(x, sigma, cond), loaded from local files only.

    UNet2DConditionModel (SD1.5, SD2.x, SDXL)       -> VPDenoiser, eps or v from the scheduler config
    PixArt-alpha PixArtTransformer2DModel
        (or the legacy Transformer2DModel)           -> VPDenoiser on the iddpm_linear table; of its
                                                        8 output channels the first 4 are kept
    SD3Transformer2DModel                            -> FlowDenoiser, timestep = num_train_timesteps * sigma

VP models: the table index that `VPDenoiser.timestep` snaps sigma to *is* the DDPM timestep (the
tables are ascending in timestep), so it goes to the network unchanged (docs/ALGORITHM.md section 2).

Conditioning is a dict of tensors, batch first (a bare tensor is taken as encoder_hidden_states):
    encoder_hidden_states   [B, L, D]  every model
    added_cond_kwargs       SDXL: {"text_embeds": [B, 1280], "time_ids": [B, 6]} (flat keys accepted too);
                            PixArt at 1024 px: {"resolution": [B, 2], "aspect_ratio": [B, 1]}, filled in
                            from the latent size when absent
    pooled_projections      [B, P]     SD3
    encoder_attention_mask  [B, L]     optional (PixArt, UNet)
A conditioning with batch 1 is broadcast to the batch of x. Floating tensors are cast to the model's
dtype (so bf16 weights take float32 latents); outputs come back in the latents' dtype.

Nothing here downloads: loaders take a local path (a model folder with config.json and weights, a
pipeline folder with model_index.json and a unet/ or transformer/ subfolder, or one .safetensors file
in diffusers layout plus its config.json) and pass local_files_only=True; a missing file raises
FileNotFoundError naming the path that was expected.

Images: `load_vae` reads a local AutoencoderKL (or AutoencoderTiny, TAESD) the same way; `VAEDecoder` is its
frozen, differentiable decode, images = (vae.decode(z / scaling_factor + shift_factor) + 1) / 2, which
rewards.LatentToImageReward wraps so that image rewards (`train --reward SPEC`) reach the generator's latents
and `eval --checkpoint --prompts` can score the generator's images.

The host is split by job; this package re-exports each module's public names:
    layout        folder layouts, file names, config reading       conditioning  conditioning dicts
    schedules     sigma tables from scheduler configs              adapters      networks, denoisers, LoRA targets,
    loading       models (and denoisers) from local files                        activation checkpointing
    vae           VAE loading and VAEDecoder                       embeddings    prompt-embeddings files
The "diffusers" training problem ([run] problem = "diffusers") is diffinstruct.run.diffusers_problem.
"""

from .adapters import (
    ATTENTION_LINEARS,
    DENOISERS,
    VAE_SCALE_FACTOR,
    DiffusersNet,
    PixArtNet,
    SD3Net,
    UNetNet,
    attention_and_conv_target,
    attention_target,
    gradient_checkpointing_enabled,
    host_model,
    pixart_denoiser,
    role_aware_checkpoint,
    sd3_denoiser,
    set_gradient_checkpointing,
    supports_gradient_checkpointing,
    unet_denoiser,
)
from .conditioning import _stack
from .embeddings import load_prompt_embeddings, save_prompt_embeddings
from .layout import (
    CLASS_NAMES,
    CONFIG_NAME,
    KINDS,
    MODEL_INDEX_NAME,
    SCHEDULER_CONFIG_NAME,
    SUBFOLDERS,
    WEIGHT_NAMES,
    Kind,
    PathLike,
)
from .loading import (
    build_model,
    detect_kind,
    load_denoiser,
    load_model,
    load_pixart_transformer,
    load_sd3_transformer,
    load_unet,
    resolve_model_path,
)
from .schedules import (
    PREDICTIONS,
    find_scheduler_config,
    load_scheduler_config,
    prediction_type,
    sigmas_from_scheduler_config,
)
from .vae import TAESD_PREFIX, VAE_CLASSES, VAEDecoder, find_vae, load_vae, resolve_vae_path, split_vae_spec

__all__ = [
    "ATTENTION_LINEARS", "CLASS_NAMES", "CONFIG_NAME", "DENOISERS", "KINDS", "MODEL_INDEX_NAME", "PREDICTIONS",
    "SCHEDULER_CONFIG_NAME", "SUBFOLDERS", "TAESD_PREFIX", "VAE_CLASSES", "VAE_SCALE_FACTOR", "WEIGHT_NAMES",
    "DiffusersNet", "Kind", "PathLike", "PixArtNet", "SD3Net", "UNetNet", "VAEDecoder", "_stack",
    "attention_and_conv_target", "attention_target", "build_model", "detect_kind", "find_scheduler_config",
    "find_vae", "gradient_checkpointing_enabled", "host_model", "load_denoiser", "load_model",
    "load_pixart_transformer", "load_prompt_embeddings", "load_scheduler_config", "load_sd3_transformer",
    "load_unet", "load_vae", "pixart_denoiser", "prediction_type", "resolve_model_path", "resolve_vae_path",
    "role_aware_checkpoint", "save_prompt_embeddings", "sd3_denoiser", "set_gradient_checkpointing",
    "sigmas_from_scheduler_config", "split_vae_spec", "supports_gradient_checkpointing", "unet_denoiser",
]
