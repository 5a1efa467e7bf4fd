"""Differentiable CLIP image preprocessing on tensors, and a per-prompt text-feature cache.

`ClipPreprocess` reproduces, on float tensors (so that gradients reach the image), the three official transforms
the rewards were trained / benchmarked with:

* `resize="shortest", crop_style="transformers"`: transformers' `CLIPImageProcessor` (CLIP score, PickScore):
  resize the shortest side to `size` (long side `int(size * long / short)`), centre crop at `(n - c) // 2`;
  a crop larger than the image is zero-padded with the extra pixel *before* the image (ceil).
* `resize="shortest", crop_style="torchvision"`: torchvision's `Resize(size, BICUBIC)` + `CenterCrop` (OpenAI
  CLIP's `_transform`, hence the LAION aesthetic predictor, and ImageReward's `_transform`): the same resize,
  crop offset `int(round((n - c) / 2))` with Python's round-half-to-even (one pixel later than the floor when
  `n - c = 3 mod 4`); padding puts the extra pixel *after* the image (floor before).
* `resize="longest"`: open_clip's `ResizeMaxSize` (HPSv2's `light_augmentation=True` eval transform): resize so the
  longest side is `size`, each side `round(side * size / longest)` (Python round), then pad with black (0 in
  [0, 1] pixels, before normalisation) to `size x size`, `pad // 2` left / top and the rest right / bottom.

Resizing uses `F.interpolate(mode="bicubic", antialias=True)`: the anti-aliased bicubic filter of PIL (a = -0.5,
support scaled by the downsampling factor), which is also what torchvision (>= 0.17) runs on tensors. HPSv2's
official transform resizes the float tensor after `ToTensor()`, so there it is the same computation; the PIL
transforms round to uint8 after each separable pass and clip the bicubic overshoot to [0, 255], which this path
does not (below one 8-bit grey level on average, checked in tests/test_rewards_preprocess.py); `clamp=True` clips
the resized image to [0, 1] (closer to PIL; zero gradient for saturated pixels).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CropStyle = Literal["transformers", "torchvision"]
ResizeMode = Literal["shortest", "longest"]


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")


def resize_shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of a shortest-side resize to `size`: the long side is `int(size * long / short)` (truncated), as
    both transformers' `get_resize_output_image_size` and torchvision's `Resize(int)` compute it."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of open_clip's `ResizeMaxSize(size)`: each side `round(side * (size / longest))`."""
    scale = size / float(max(height, width))
    if scale == 1.0:
        return height, width
    # the same float expression as open_clip, so that halves and near-halves round the same way
    out = (round(height * scale), round(width * scale))
    if min(out) < 1:
        raise ValueError(f"a {height}x{width} image is too elongated to resize its longest side to {size}")
    return out


def centre_window(n: int, c: int, style: CropStyle) -> tuple[int, int, int]:
    """(pad before, pad after, crop offset) along one axis of length `n` for a centred window of `c` pixels."""
    if n < c:
        p = c - n
        before = (p + 1) // 2 if style == "transformers" else p // 2
        return before, p - before, 0
    d = n - c
    return 0, 0, (d // 2 if style == "transformers" else int(round(d / 2.0)))


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
    resize: ResizeMode = "shortest"
    crop_style: CropStyle = "transformers"
    antialias: bool = True  # torchvision < 0.17 resized tensors without it (HPSv2 on old installs)

    def __post_init__(self) -> None:
        if self.resize not in ("shortest", "longest"):
            raise ValueError(f"resize must be 'shortest' or 'longest', got {self.resize!r}")
        if self.crop_style not in ("transformers", "torchvision"):
            raise ValueError(f"crop_style must be 'transformers' or 'torchvision', got {self.crop_style!r}")
        if self.resize == "longest" and tuple(self.crop) != (self.size, self.size):
            raise ValueError(f"resize='longest' pads to size x size; crop {self.crop} must be ({self.size}, "
                             f"{self.size})")

    @classmethod
    def torchvision(cls, size: int = 224, clamp: bool = False) -> ClipPreprocess:
        """`Resize(size, BICUBIC)`, `CenterCrop(size)`, CLIP mean / std (OpenAI CLIP, ImageReward)."""
        return cls(size=size, crop=(size, size), clamp=clamp, crop_style="torchvision")

    @classmethod
    def resize_max_size(cls, size: int = 224, clamp: bool = False, antialias: bool = True) -> ClipPreprocess:
        """open_clip's `ResizeMaxSize(size)` (black padding), CLIP mean / std (HPSv2)."""
        return cls(size=size, crop=(size, size), clamp=clamp, resize="longest", antialias=antialias)

    @classmethod
    def from_pretrained(cls, folder: str | Path, clamp: bool = False,
                        crop_style: CropStyle = "transformers") -> ClipPreprocess:
        """Reads `preprocessor_config.json` in `folder` if present (Hugging Face layout), else CLIP defaults."""
        cfg_path = Path(folder) / "preprocessor_config.json"
        if not cfg_path.is_file():
            return cls(clamp=clamp, crop_style=crop_style)
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
        return cls(size=int(size), crop=crop_hw, mean=mean, std=std, clamp=clamp,  # type: ignore[arg-type]
                   crop_style=crop_style)

    def output_geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int, int, int],
                                                                    tuple[int, int]]:
        """((resized h, w), (pad left, right, top, bottom), (crop top, left)) for an input of height x width."""
        if self.resize == "longest":
            oh, ow = resize_longest_edge_size(height, width, self.size)
            ph, pw = self.size - oh, self.size - ow
            return (oh, ow), (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), (0, 0)
        oh, ow = resize_shortest_edge_size(height, width, self.size)
        top_before, top_after, top = centre_window(oh, self.crop[0], self.crop_style)
        left_before, left_after, left = centre_window(ow, self.crop[1], self.crop_style)
        return (oh, ow), (left_before, left_after, top_before, top_after), (top, left)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = at_least_fp32(images)
        h, w = x.shape[-2:]
        (oh, ow), pad, (top, left) = self.output_geometry(h, w)
        if (oh, ow) != (h, w):
            x = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=self.antialias)
            if self.clamp:
                x = x.clamp(0.0, 1.0)
        if any(pad):
            x = F.pad(x, pad)  # zeros in [0, 1] pixels: black, as PIL / torchvision pad before normalising
        ch, cw = self.crop
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
