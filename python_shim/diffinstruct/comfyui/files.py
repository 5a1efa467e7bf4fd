"""Files and pictures for the node pack: LoRA export in ComfyUI's key format, merging, atomic saving,
and the loss / reward curves drawn as an IMAGE (PIL only, so no plotting library is needed)."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora import lora_state_dict
from .specs import TrainedWeights

SUFFIX = ".safetensors"


def lora_for_host(model: nn.Module, role: str, comfy_prefix: bool) -> dict[str, torch.Tensor]:
    """One role's LoRA tensors; with comfy_prefix the keys are ComfyUI's "diffusion_model.<layer>.lora_up.weight"
    (ComfyDenoiser keeps the BaseModel as `.model`, so its layer names start with "model.")."""
    out = {}
    for key, value in lora_state_dict(model, role).items():
        if comfy_prefix:
            key = key.removeprefix("model.")
        out[key] = value.detach().float().cpu().contiguous()
    return out


@torch.no_grad()
def merge_lora(module: nn.Module, lora: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """W += strength * alpha / rank * up @ down for every layer of `lora` (the rule ComfyUI's loader applies);
    returns the number of layers merged. Conv LoRA: down is k x k, up is 1 x 1."""
    params = dict(module.named_parameters())
    merged = 0
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        layer = key[: -len(".lora_down.weight")]
        down, up = lora[key], lora[f"{layer}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(lora.get(f"{layer}.alpha", torch.tensor(float(rank))))
        weight = params.get(f"{layer}.weight")
        if weight is None:
            raise KeyError(f"LoRA layer {layer!r} has no matching weight in the model")
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        weight.add_((strength * alpha / rank * delta).to(weight.device, weight.dtype))
        merged += 1
    return merged


def _unique_path(folder: Path, prefix: str) -> Path:
    counter = 1
    while True:
        path = folder / f"{prefix}_{counter:05d}{SUFFIX}"
        if not path.exists():
            return path
        counter += 1


def check_prefix(filename_prefix: str) -> str:
    """The prefix as a relative name (folders separated by /), or ValueError: no absolute path, no '..'."""
    prefix = filename_prefix.strip().replace("\\", "/")
    if not prefix or prefix.startswith("/") or ".." in Path(prefix).parts:
        raise ValueError(f"filename_prefix {filename_prefix!r} must be a relative name such as "
                         "'diffinstruct/aligned'")
    return prefix


def save_weights(weights: TrainedWeights, folder: str | os.PathLike[str], filename_prefix: str,
                 extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `weights` to folder/<prefix>_NNNNN.safetensors atomically (temporary file + fsync + rename).

    On any failure (a full disk included) the temporary file is removed and an OSError names the target.
    """
    from safetensors.torch import save_file

    prefix = check_prefix(filename_prefix)
    if not weights.tensors:
        raise ValueError("there are no weights to save")
    base = Path(folder).expanduser()
    target_dir = (base / prefix).parent
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the folder {target_dir}: {exc.strerror or exc}") from exc
    path = _unique_path(target_dir, Path(prefix).name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    metadata = {**weights.metadata, **(extra_metadata or {}), "diffinstruct.kind": weights.kind}
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(f"could not save {path}: {exc.strerror or exc} (nothing was written)") from exc
        raise
    return path


# ============================================================================================== curves
_SERIES = (("ta_loss", (31, 119, 180)), ("surrogate", (255, 127, 14)), ("divergence", (148, 103, 189)),
           ("reward", (44, 160, 44)))


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def curves_image(records: Sequence[dict[str, Any]], width: int = 512, height: int = 256) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: one min-max-normalised line per series (TA loss, generator surrogate or DI*
    divergence, reward) against the step, with the series' first and last values in the legend."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 8, 8, width - 8, height - 8 - 12 * len(_SERIES)
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    legend_y = bottom + 4
    for key, colour in _SERIES:
        pairs = [(r.get("step", i), r.get(key)) for i, r in enumerate(records)]
        pairs = [(float(s), float(v)) for s, v in pairs if isinstance(v, int | float) and math.isfinite(v)]
        if not pairs:
            continue
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        pts = [(left + (right - left) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5),
                bottom - (bottom - top) * ((y - y0) / (y1 - y0) if y1 > y0 else 0.5)) for x, y in pairs]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        else:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
        draw.text((left, legend_y), f"{key}: {ys[0]:.4g} -> {ys[-1]:.4g}", fill=colour)
        legend_y += 12
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (data.float() / 255.0)[None]
