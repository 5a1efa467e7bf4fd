"""Tiny ComfyUI objects for host tests, built with ComfyUI's own classes and no downloads (docs/COMFYUI.md section 7).

MODEL: a real SD1.5 `BaseModel` (EPS, ModelSamplingDiscrete, SD15 latent format) with a shallow UNet;
CLIP: a real `comfy.sd.CLIP` (SD1 tokenizer files shipped with ComfyUI) over a 1-layer, 64-wide text model;
VAE: a real `comfy.sd.VAE` holding TAESD. Weights are random with a fixed seed (ComfyUI's layers skip
initialisation, so they are initialised here).
"""

from __future__ import annotations

import functools

import torch

CONTEXT_DIM = 64

UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM, "use_linear_in_transformer": False,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False, "num_head_channels": -1,
}

CLIP_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": CONTEXT_DIM, "intermediate_size": 128, "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77, "num_attention_heads": 2, "num_hidden_layers": 1, "projection_dim": CONTEXT_DIM,
    "vocab_size": 49408, "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1,
}


@torch.no_grad()
def _init(module: torch.nn.Module, seed: int, gain: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.numel() == 0:
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * gain / fan_in**0.5)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def tiny_model(seed: int = 0, model_type: str = "EPS"):
    """model_type: a comfy.model_base.ModelType name (EPS, V_PREDICTION, FLOW...) for the same tiny UNet."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(UNET_CONFIG, dtype=torch.float32))
    cfg.set_inference_dtype(torch.float32, None)
    if model_type == "EPS":
        model = cfg.get_model({})
    else:
        model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType[model_type])
    _init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_sdxl_model(seed: int = 0):
    """A real `SDXL` BaseModel (pooled text + size embeddings as `y`) over a shallow UNet."""
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(UNET_CONFIG, adm_in_channels=2816, num_classes="sequential", model_channels=64, dtype=torch.float32)
    cfg = comfy.supported_models.SDXL(config)  # SDXL fixes 64 channels per attention head
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    _init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sdxl_conditioning(seed: int):
    """CONDITIONING as SDXL's CLIPTextEncode makes it: tokens plus a 1280-wide pooled vector."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, CONTEXT_DIM, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]


def tiny_clip(seed: int = 0):
    import comfy.sd
    import comfy.sd1_clip

    class TinyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
            super().__init__(device=device, dtype=dtype, model_options=model_options, return_projected_pooled=False,
                             textmodel_json_config=dict(CLIP_CONFIG))

    class Target:
        params = {}
        clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=TinyClipModel)
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options={"load_device": torch.device("cpu"),
                                                        "offload_device": torch.device("cpu"),
                                                        "dtype": torch.float32})
    _init(clip.cond_stage_model, seed + 1, gain=1.0)
    return clip


def tiny_vae(seed: int = 0):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    torch.manual_seed(seed)
    for m in taesd.modules():  # ComfyUI's layers skip init: PyTorch's default (Kaiming-uniform) init
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    last = [m for m in taesd.taesd_decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # images start mid-grey instead of clamped at 0, so rewards have gradients
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    return comfy.sd.VAE(sd=taesd.state_dict())
