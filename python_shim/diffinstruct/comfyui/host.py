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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModel

SUPPORTED = ("SD1.5 and SDXL (epsilon prediction), v-prediction and EDM models, and flow models (SD3, Flux); "
             "or a diffinstruct denoiser module")
VE_PARAMETERISATIONS = ("EPS", "V_PREDICTION", "EDM", "X0")
FLOW_PARAMETERISATIONS = ("CONST",)
UNSUPPORTED_PARAMETERISATIONS = ("IMG_TO_IMG", "COSMOS_RFLOW")


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
    if dims != 2:
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


# ============================================================================================== the denoiser
class ComfyDenoiser(nn.Module):
    """D(x, sigma, cond) -> x0 over a private copy of a ComfyUI BaseModel: `apply_model` takes sigma as t.

    cond is a dict of model inputs (c_crossattn, y, guidance...) built by `encode_conditioning`. For EPS,
    V and EDM models x is x0 + sigma eps ("ve"); for CONST (rectified flow) models it is
    (1 - sigma) x0 + sigma eps ("flow"), and apply_model's output is x0 in both cases.
    """

    def __init__(self, base_model: nn.Module, process: str) -> None:
        super().__init__()
        self.model = base_model
        self.process = process
        ms = base_model.model_sampling
        lo, hi = float(ms.sigma_min), float(ms.sigma_max)
        if process == "flow":  # the engine's VE view divides by 1 - sigma: keep it away from 0 and 1
            lo, hi = max(lo, 1e-3), min(hi, 1.0 - 1e-3)
        self.sigma_min, self.sigma_max = lo, hi

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        kwargs = cond if isinstance(cond, dict) else {"c_crossattn": cond}
        return self.model.apply_model(x, sigma.to(x.device), **kwargs)


def _plain_layers(module: nn.Module) -> None:
    """Make comfy.ops layers run their plain torch forward on the copy: no per-forward casts or patches
    (weights are already in the training dtype and ComfyUI's patches are baked in at load)."""
    for m in module.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = False
        if isinstance(getattr(m, "weight_function", None), list):
            m.weight_function = []
        if isinstance(getattr(m, "bias_function", None), list):
            m.bias_function = []


def _copy_base_model(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A BaseModel sharing model_sampling / latent_format with `base` but owning a copy of its network."""
    new = copy.copy(base)
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(new, attr, OrderedDict(getattr(base, attr)))
    for attr in ("current_patcher",):
        if attr in new.__dict__:
            new.__dict__[attr] = None
    net = copy.deepcopy(base.diffusion_model).to(dtype)  # clones every tensor: no inference tensors remain
    _plain_layers(net)
    new.diffusion_model = net
    new.manual_cast_dtype = None
    if hasattr(net, "dtype"):
        net.dtype = dtype
    return new


def trainable_copy(model: Any, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> nn.Module:
    """A denoiser the engine may attach LoRA layers to and train, independent of `model`.

    Call outside inference mode (the training entry points do).
    """
    process, _ = model_family(model)
    if is_package_denoiser(model):
        out = copy.deepcopy(model).to(dtype)
        return out.to(device) if device is not None else out
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)  # bakes LoRA/weight patches into the shared weights
    dev = device if device is not None else model.load_device
    copied = _copy_base_model(model.model, dtype).to(dev)
    return ComfyDenoiser(copied, process)


def frozen_view(model: Any) -> nn.Module:
    """A denoiser over `model` for inference only (sampling, evaluation): no copy for ComfyUI models."""
    process, _ = model_family(model)
    if is_package_denoiser(model):
        return model
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    return ComfyDenoiser(model.model, process)


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
        return model.model.latent_format.process_out(x0)
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
    out: dict[str, torch.Tensor] = {}
    for key, value in base.extra_conds(**params).items():
        data = getattr(value, "cond", value)
        if key == "c_concat":
            raise UnsupportedModel(f"{type(base).__name__} needs an image/concat input (inpainting, edit or video "
                                   f"models are not supported); supported: {SUPPORTED}")
        if isinstance(data, torch.Tensor):
            out[key] = data.detach().clone().to(device)
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

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.module.decode(latents.to(self.device, self.dtype)) if hasattr(self.module, "decode") \
            else self.module(latents.to(self.device, self.dtype))
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
        return Decoder(module, vae.process_output, torch.float32 if dev.type == "cpu" else vae.vae_dtype, dev)
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
