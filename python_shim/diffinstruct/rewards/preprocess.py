"""Differentiable CLIP image preprocessing on tensors, and a per-prompt text-feature cache.

`ClipPreprocess` reproduces transformers' `CLIPImageProcessor` (resize the shortest side with bicubic
resampling, center crop, rescale, normalise with the CLIP mean / std) on float tensors, so that
gradients reach the image. Resizing uses `F.interpolate(mode="bicubic", antialias=True)`, whose
anti-aliased bicubic filter is PIL's (a = -0.5, support scaled by the downsampling factor).

Differences from the PIL path, all below one 8-bit grey level (checked in tests/test_rewards_preprocess.py):
PIL rounds the resized image to uint8 and clips bicubic overshoot to [0, 255]; here nothing is
rounded and overshoot is kept unless `clamp=True` (a clamp zeroes the gradient of saturated pixels).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")


def resize_shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of CLIPImageProcessor's `shortest_edge` resize: short side = size, long side truncated."""
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 / integer -> float32; float64 stays (gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass(frozen=True)
class ClipPreprocess:
    """images [B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, crop_h, crop_w] (float32; float64 stays)."""

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    clamp: bool = False

    @classmethod
    def from_pretrained(cls, folder: str | Path, clamp: bool = False) -> ClipPreprocess:
        """Reads `preprocessor_config.json` in `folder` if present (Hugging Face layout), else CLIP defaults."""
        cfg_path = Path(folder) / "preprocessor_config.json"
        if not cfg_path.is_file():
            return cls(clamp=clamp)
        cfg = json.loads(cfg_path.read_text())
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", 224))
        crop = cfg.get("crop_size", size)
        crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        if cfg.get("resample", 3) != 3:
            raise ValueError(f"{cfg_path}: only bicubic resampling (resample=3) is implemented")
        if cfg.get("do_resize", True) is False or cfg.get("do_center_crop", True) is False:
            raise ValueError(f"{cfg_path}: do_resize / do_center_crop = false is not supported")
        mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
        return cls(size=int(size), crop=crop_hw, mean=mean, std=std, clamp=clamp)  # type: ignore[arg-type]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = at_least_fp32(images)
        h, w = x.shape[-2:]
        oh, ow = resize_shortest_edge_size(h, w, self.size)
        if (oh, ow) != (h, w):
            x = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)
            if self.clamp:
                x = x.clamp(0.0, 1.0)
        ch, cw = self.crop
        if oh < ch or ow < cw:  # zero padding, centred as in transformers' center_crop
            ph, pw = max(ch - oh, 0), max(cw - ow, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            oh, ow = x.shape[-2:]
        top, left = (oh - ch) // 2, (ow - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class TextFeatureCache:
    """Per-prompt cache of (detached, float32) text features; least recently used entries are evicted.

    `encode(list_of_new_prompts) -> [N, D]` is called once per batch for the prompts not yet cached.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_entries: int = 4096) -> None:
        self.encode = encode
        self.max_entries = int(max_entries)
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            with torch.no_grad():
                feats = at_least_fp32(self.encode(missing).detach())
            for p, f in zip(missing, feats, strict=True):
                self._store[p] = f
        out = []
        for p in prompts:
            self._store.move_to_end(p)
            out.append(self._store[p])
        while self.max_entries > 0 and len(self._store) > self.max_entries:
            self._store.popitem(last=False)
        feats = torch.stack(out)
        return feats.to(device) if device is not None else feats
