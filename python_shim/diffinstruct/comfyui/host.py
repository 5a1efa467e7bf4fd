"""ComfyUI as a host: its MODEL, CLIP, VAE and CONDITIONING objects seen through the engine's interfaces.

Every function also accepts the package's own objects (a `Denoiser` module for MODEL, a prompt -> tensor
callable for CLIP, a latents -> images module for VAE; see tests/comfy_tiny.py), so the node pack runs and is
tested without ComfyUI. `comfy` is imported lazily, inside functions that only run when ComfyUI objects
are passed (docs/COMFYUI.md section 1: the pack must import without it).

A ComfyUI MODEL (ModelPatcher) is trained on a private copy of its network: the patcher's module is
shared by every clone in the graph (docs/COMFYUI.md section 2), and attaching LoRA layers to it would change
the model for every other node. The copy is made outside inference mode, so its weights are ordinary
tensors that autograd can cross.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModel
from .copies import copy_base_model

SUPPORTED = ("SD1.5 and SDXL (epsilon prediction), v-prediction and EDM models, flow models (SD3/3.5, Flux.1, "
             "Chroma, Lumina 2 / Z-Image, Qwen-Image, HiDream, AuraFlow), PixArt and HunyuanDiT; or a diffinstruct "
             "denoiser module")
VE_PARAMETERISATIONS = ("EPS", "V_PREDICTION", "EDM", "X0")
FLOW_PARAMETERISATIONS = ("CONST",)
UNSUPPORTED_PARAMETERISATIONS = ("IMG_TO_IMG", "COSMOS_RFLOW")
# image models whose latent format is the video VAE's 3-D one, sampled on [B, C, 1, H, W]: the engine sees the
# frame axis squeezed out (ComfyDenoiser and to_raw_latent put it back)
IMAGE_MODELS_ON_3D_LATENTS = ("QwenImage",)



# ============================================================================================== what was passed
def is_comfy_model(model: Any) -> bool:
    """A ComfyUI ModelPatcher (duck-typed: no comfy import needed)."""
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "apply_model") and hasattr(inner, "model_sampling")


def is_package_denoiser(model: Any) -> bool:
    return isinstance(model, nn.Module) and all(hasattr(model, a) for a in ("process", "sigma_min", "sigma_max"))


def is_comfy_clip(clip: Any) -> bool:
    return hasattr(clip, "tokenize") and hasattr(clip, "encode_from_tokens_scheduled")


def is_comfy_vae(vae: Any) -> bool:
    return hasattr(vae, "first_stage_model") and hasattr(vae, "process_output")


def describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def parameterisation(base_model: Any) -> str:
    """The model_sampling parameterisation class name of a ComfyUI BaseModel (EPS, V_PREDICTION, CONST...)."""
    names = [c.__name__ for c in type(base_model.model_sampling).__mro__]
    for name in UNSUPPORTED_PARAMETERISATIONS + FLOW_PARAMETERISATIONS + VE_PARAMETERISATIONS:
        if name in names:
            return name
    return "/".join(names[:3])


def model_family(model: Any) -> tuple[str, str]:
    """(process, label): process "ve" or "flow" for the engine; raises UnsupportedModel with what is supported."""
    if is_package_denoiser(model):
        return str(model.process), type(model).__name__
    if not is_comfy_model(model):
        raise UnsupportedModel(f"expected a ComfyUI MODEL or a diffinstruct denoiser, got {describe(model)}; "
                               f"supported: {SUPPORTED}")
    base = model.model
    kind = parameterisation(base)
    label = f"{type(base).__name__} ({kind})"
    latent_format = getattr(base, "latent_format", None)
    dims = getattr(latent_format, "latent_dimensions", 2)
    if dims != 2 and type(base).__name__ not in IMAGE_MODELS_ON_3D_LATENTS:
        what = "an audio (1-D latent)" if dims == 1 else "a video or 3-D latent"
        raise UnsupportedModel(f"{label} is {what} model: the pack trains text-to-image generators only; "
                               f"supported: {SUPPORTED}")
    if tuple(getattr(base, "concat_keys", ())):
        # inpainting / edit / image-to-video variants: their denoiser also takes a mask or an image we do not have
        raise UnsupportedModel(f"{label} is an inpainting or edit variant (it also takes {', '.join(base.concat_keys)}"
                               f"); use the text-to-image checkpoint of the family; supported: {SUPPORTED}")
    if kind in FLOW_PARAMETERISATIONS:
        return "flow", label
    if kind in VE_PARAMETERISATIONS:
        return "ve", label
    raise UnsupportedModel(f"{label} is not supported (parameterisation {kind}); supported: {SUPPORTED}")


def guidance_distilled(model: Any) -> bool:
    """A model trained to take the CFG scale as an input (Flux.1 dev's guidance embedding): it is guided by the
    `guidance` value in its conditioning (what FluxGuidance sets), in one pass, not by CFG's second pass."""
    if not is_comfy_model(model):
        return False
    net = getattr(model.model, "diffusion_model", None)
    if getattr(getattr(net, "params", None), "guidance_embed", False):
        return True
    embed = getattr(net, "guidance_in", None)
    return isinstance(embed, nn.Module) and not isinstance(embed, nn.Identity)


# ============================================================================================== the denoiser
class ComfyDenoiser(nn.Module):
    """D(x, sigma, cond) -> x0 over a private copy of a ComfyUI BaseModel: `apply_model` takes sigma as t.

    cond is a dict of model inputs (c_crossattn, y, guidance...) built by `encode_conditioning`. For EPS,
    V and EDM models x is x0 + sigma eps ("ve"); for CONST (rectified flow) models it is
    (1 - sigma) x0 + sigma eps ("flow"), and apply_model's output is x0 in both cases.
    """

    def __init__(self, base_model: nn.Module, process: str, model_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = base_model
        self.process = process
        # the MODEL's patches from other nodes (transformer_options: attention / block patches and wrappers;
        # model_function_wrapper), applied as ComfyUI's sampler applies them
        self.model_options = model_options or {}
        ms = base_model.model_sampling
        lo, hi = float(ms.sigma_min), float(ms.sigma_max)
        if process == "flow":  # the engine's VE view divides by 1 - sigma: keep it away from 0 and 1
            lo, hi = max(lo, 1e-3), min(hi, 1.0 - 1e-3)
        self.sigma_min, self.sigma_max = lo, hi
        self.frame_axis = on_3d_latents(base_model)

    def __deepcopy__(self, memo: dict[int, Any]) -> ComfyDenoiser:
        """Copies of the network (the TA, the EMA) share the MODEL's patches: they belong to the host's graph and
        need not be copyable."""
        memo[id(self.model_options)] = self.model_options
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def train(self, mode: bool = True) -> ComfyDenoiser:
        """The network stays in eval mode: training must change the function ComfyUI samples with, and train-mode
        behaviours would change it (PixArt's caption dropout drops prompts, and makes its mask on `cuda`)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        kwargs = cond if isinstance(cond, dict) else {"c_crossattn": cond}
        x_in = x.unsqueeze(2) if self.frame_axis else x
        timestep = sigma.to(x.device)
        options = self.model_options.get("transformer_options")
        if options:
            kwargs = {**kwargs, "transformer_options": {**options, "sigmas": timestep}}
        wrapper = self.model_options.get("model_function_wrapper")
        if wrapper is not None:
            out = wrapper(self.model.apply_model, {"input": x_in, "timestep": timestep, "c": kwargs,
                                                   "cond_or_uncond": []})
        else:
            out = self.model.apply_model(x_in, timestep, **kwargs)
        return out.squeeze(2) if self.frame_axis else out


def model_patches(model: Any) -> list[str]:
    """The kinds of patch other nodes put on a MODEL (output_block_patch, attn1 replacements, a model function
    wrapper...), for messages."""
    if not is_comfy_model(model):
        return []
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    names = [k for k, v in (transformer.get("patches", {}) or {}).items() if v]
    names += [f"{k} replacement" for k, v in (transformer.get("patches_replace", {}) or {}).items() if v]
    return names + (["model_function_wrapper"] if options.get("model_function_wrapper") is not None else [])


def on_3d_latents(base_model: Any) -> bool:
    """An image model on the video VAE's latents ([B, C, 1, H, W]; Qwen-Image)."""
    return getattr(getattr(base_model, "latent_format", None), "latent_dimensions", 2) == 3 and \
        type(base_model).__name__ in IMAGE_MODELS_ON_3D_LATENTS


def trainable_copy(model: Any, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                   keep_weight_dtype: bool = False) -> nn.Module:
    """A denoiser the engine may attach LoRA layers to and train, independent of `model`.

    keep_weight_dtype: a MODEL loaded in fp8 or bf16 keeps its weights so (for a frozen base under LoRA: the
    shared mode); they compute in `dtype`. Call outside inference mode (the training entry points do).
    """
    process, _ = model_family(model)
    if is_package_denoiser(model):
        out = copy.deepcopy(model).to(dtype)
        return out.to(device) if device is not None else out
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)  # bakes LoRA/weight patches into the shared weights
    dev = device if device is not None else model.load_device
    copied = copy_base_model(model.model, dtype, keep_weight_dtype).to(dev)
    return ComfyDenoiser(copied, process, model.model_options)


def frozen_view(model: Any) -> nn.Module:
    """A denoiser over `model` for inference only (sampling, evaluation): no copy for ComfyUI models."""
    process, _ = model_family(model)
    if is_package_denoiser(model):
        return model
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    return ComfyDenoiser(model.model, process, model.model_options)


def model_device(model: Any) -> torch.device:
    if is_comfy_model(model):
        return torch.device(model.load_device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def latent_channels(model: Any) -> int:
    if is_comfy_model(model):
        return int(model.model.latent_format.latent_channels)
    return int(getattr(model, "latent_channels", 4))


def to_raw_latent(model: Any, x0: torch.Tensor) -> torch.Tensor:
    """Model-space x0 -> what a LATENT holds (ComfyUI's latent_format.process_out); identity for our models."""
    if is_comfy_model(model):
        base = model.model
        return base.latent_format.process_out(x0.unsqueeze(2) if on_3d_latents(base) else x0)
    return x0


def sigma_init_of(model: Any) -> float | None:
    """The one-step generator's sigma_init recorded on an aligned MODEL, or None for a plain model."""
    if is_comfy_model(model):
        value = model.model_options.get("diffinstruct", {}).get("sigma_init")
    else:
        value = getattr(model, "diffinstruct_sigma_init", None)
    return None if value is None else float(value)


# ============================================================================================== conditioning
Entry = Sequence[Any]  # one CONDITIONING entry: [tensor (1, T, D), {extra}]


def conditioning_entries(conditioning: Any, what: str) -> list[Entry]:
    """The entries of a CONDITIONING list, checked."""
    if not isinstance(conditioning, list | tuple) or not conditioning:
        raise ValueError(f"{what}: expected a non-empty CONDITIONING (list of [tensor, dict]), got "
                         f"{describe(conditioning)}")
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, list | tuple) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
            raise ValueError(f"{what}: entry {i} is not [tensor, dict]")
    return list(conditioning)


def encode_conditioning(model: Any, entry: Entry, latent_hw: tuple[int, int], downscale: int = 8) -> Any:
    """One CONDITIONING entry (batch 1) -> the engine's cond: model inputs for ComfyUI, the tensor for ours."""
    tensor, extra = entry[0], dict(entry[1] or {})
    if tensor.dim() == 3 and tensor.shape[0] != 1:
        tensor = tensor[:1]
    if not is_comfy_model(model):
        return tensor.detach().clone()
    base = model.model
    device = torch.device(model.load_device)
    h, w = latent_hw
    params = {k: v for k, v in extra.items() if k not in ("model_conds", "control", "gligen", "hooks")}
    params.update(cross_attn=tensor, device=device, noise=torch.zeros((1, latent_channels(model), h, w)),
                  width=params.get("width", w * downscale), height=params.get("height", h * downscale))
    out: dict[str, Any] = {}
    for key, value in base.extra_conds(**params).items():
        data = getattr(value, "cond", value)
        if key == "c_concat":
            raise UnsupportedModel(f"{type(base).__name__} needs an image/concat input (inpainting, edit or video "
                                   f"models are not supported); supported: {SUPPORTED}")
        if isinstance(data, torch.Tensor):
            out[key] = data.detach().clone().to(device)
        elif isinstance(data, bool | int | float):  # a CONDConstant: Lumina 2's num_tokens
            out[key] = data
    if "c_crossattn" not in out:
        raise UnsupportedModel(f"{type(base).__name__} produced no cross-attention conditioning; "
                               f"supported: {SUPPORTED}")
    return out


def encode_prompts(clip: Any, prompts: Sequence[str]) -> dict[str, Entry]:
    """prompt -> CONDITIONING entry, with a ComfyUI CLIP or a prompt -> tensor callable."""
    out: dict[str, Entry] = {}
    with torch.no_grad():
        for prompt in prompts:
            if prompt in out:
                continue
            if is_comfy_clip(clip):
                cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
                out[prompt] = [cond[0][0], dict(cond[0][1])]
            elif callable(clip):
                out[prompt] = [clip(prompt), {}]
            else:
                raise TypeError(f"expected a ComfyUI CLIP or a prompt encoder, got {describe(clip)}")
    return out


def parse_prompts(text: str | Sequence[str], what: str = "prompts") -> list[str]:
    """One prompt per line (blank lines and '#' comments skipped); an empty list is an error."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    prompts = [p.strip() for p in lines if isinstance(p, str) and p.strip() and not p.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"{what}: the prompt list is empty; write one prompt per line")
    return prompts


# ============================================================================================== VAE
def vae_downscale(vae: Any) -> int:
    if is_comfy_vae(vae):
        ratio = getattr(vae, "downscale_ratio", 8)
        return int(ratio) if isinstance(ratio, int) else 8
    return int(getattr(vae, "downscale", 8))


@dataclass
class Decoder:
    """Raw latents -> images [B, 3, H, W] in [0, 1], differentiable (a private copy of a ComfyUI VAE's decoder)."""

    module: nn.Module
    process_output: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    latent_dim: int = 2  # 3: a video VAE (Qwen-Image's Wan 2.1), which takes [B, C, T, H, W]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        # one image is one frame: a 2-D VAE gets it without the frame axis, a video VAE with it
        if self.latent_dim == 2 and latents.dim() == 5 and latents.shape[2] == 1:
            latents = latents[:, :, 0]
        elif self.latent_dim == 3 and latents.dim() == 4:
            latents = latents.unsqueeze(2)
        latents = latents.to(self.device, self.dtype)
        images = self.module.decode(latents) if hasattr(self.module, "decode") else self.module(latents)
        if images.dim() == 5:  # [B, 3, T, H, W] from a video VAE
            images = images[:, :, 0]
        return self.process_output(images.float())


def differentiable_decoder(vae: Any, device: torch.device | None = None) -> Decoder:
    """Call outside inference mode: the copy's weights must be ordinary tensors for gradients to cross them.

    ComfyUI's own VAE.decode is not used: its OOM fallback (tiled decode) runs under inference mode and
    would silently cut the reward gradient (docs/COMFYUI.md section 4).
    """
    if is_comfy_vae(vae):
        import comfy.model_management as mm

        mm.load_models_gpu([vae.patcher])
        dev = device if device is not None else torch.device(vae.device)
        module = copy.deepcopy(vae.first_stage_model).to(dev).requires_grad_(False).eval()
        return Decoder(module, vae.process_output, torch.float32 if dev.type == "cpu" else vae.vae_dtype, dev,
                       int(getattr(vae, "latent_dim", 2)))
    if isinstance(vae, nn.Module):
        dev = device if device is not None else next(iter(vae.parameters()), torch.zeros(())).device
        module = copy.deepcopy(vae).to(dev).requires_grad_(False).eval()
        return Decoder(module, lambda x: x, torch.float32, dev)
    raise TypeError(f"expected a ComfyUI VAE or a diffinstruct decoder module, got {describe(vae)}")


def to_image(images_bchw: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> ComfyUI IMAGE [B, H, W, 3] float32 on the CPU."""
    return images_bchw.detach().float().clamp(0, 1).movedim(1, -1).cpu().contiguous()


# ============================================================================================== host services
class HostHooks:
    """Progress and interruption; ComfyUI's versions when it is running, no-ops otherwise."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self._bar: Any = None
        self._mm: Any = None
        try:
            import comfy.model_management as mm
            import comfy.utils
        except ImportError:
            return
        self._mm = mm
        self._bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def progress(self, done: int, preview: Any = None) -> None:
        """Advance the bar; `preview` (a PIL image) goes with it through ComfyUI's progress-with-preview path,
        shown on the node at full size (no max_size)."""
        if self._bar is not None:
            self._bar.update_absolute(done, self.total, ("JPEG", preview, None) if preview is not None else None)

    def check_interrupt(self) -> None:
        """Raises ComfyUI's InterruptProcessingException when the user pressed Cancel."""
        if self._mm is not None:
            self._mm.throw_exception_if_processing_interrupted()


STATUS_EVENT = "diffinstruct.progress"  # what comfyui/web/diffinstruct.js listens to (docs/COMFYUI.md section 10)


def send_status(node_id: str | None, lines: Sequence[str], warning: bool = False) -> bool:
    """Show `lines` on node `node_id` on the canvas (the pack's web extension), when ComfyUI's server runs."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or node_id is None:
        return False
    instance.send_sync(STATUS_EVENT, {"node": str(node_id), "lines": list(lines), "warning": bool(warning)},
                       getattr(instance, "client_id", None))
    return True


def release_memory() -> None:
    gc.collect()
    try:
        import comfy.model_management as mm
    except ImportError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    mm.soft_empty_cache()


def models_dir() -> str | None:
    """ComfyUI's models folder (reward weights are looked up there), when ComfyUI is running."""
    try:
        import folder_paths
    except ImportError:
        return None
    return str(folder_paths.models_dir)
