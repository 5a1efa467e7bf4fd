"""Tensor CLIP preprocessing vs the PIL path of transformers' CLIPImageProcessor, and the text-feature cache.

Tolerances (pixel units, 1 grey level = 1/255, compared before normalisation):
* against PIL's float ("F" mode) bicubic resize, which has no rounding: max 1e-3 grey levels (the filters are the same);
* against CLIPImageProcessor (PIL on uint8: two separable passes, each rounded to uint8 and clipped to [0, 255]):
  smooth images max 1.5 and mean 0.5 grey levels; white-noise images mean 0.6 grey levels (their max error is
  larger, up to ~30 levels at single pixels, because PIL clips the bicubic overshoot between its two passes).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffinstruct.rewards import CLIP_STD, ClipPreprocess, TextFeatureCache
from diffinstruct.rewards.preprocess import resize_shortest_edge_size

SIZES = [(512, 512), (300, 451), (96, 128), (224, 224), (640, 360), (60, 100)]


def _uint8_image(h: int, w: int, smooth: bool, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    if smooth:
        low = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
        img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    else:
        img = torch.rand(1, 3, h, w, generator=g)
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _to_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255


def _grey_levels(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((ours - ref) * std * 255).abs()


@pytest.fixture(scope="module")
def processor():
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor()  # PIL backend (torchvision is not installed): the official slow path


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("smooth", [True, False])
def test_matches_clip_image_processor(processor, hw, smooth):
    u8 = _uint8_image(*hw, smooth=smooth, seed=hw[0] * 7 + hw[1])
    ref = processor(images=[u8], return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess()(_to_tensor(u8))
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    d = _grey_levels(ours, ref)
    if hw == (224, 224):
        assert float(d.max()) < 1e-3  # no resize: only rescale + normalise
    elif smooth:
        assert float(d.max()) <= 1.5 and float(d.mean()) <= 0.5
    else:
        assert float(d.mean()) <= 0.6


@pytest.mark.parametrize("hw", [(300, 451), (60, 100), (512, 512)])
def test_resize_is_pils_bicubic_filter(hw):
    from PIL import Image

    h, w = hw
    oh, ow = resize_shortest_edge_size(h, w, 224)
    u8 = _uint8_image(h, w, smooth=False, seed=1)
    ref = np.stack([np.asarray(Image.fromarray(u8[..., c].astype(np.float32), mode="F")
                               .resize((ow, oh), resample=Image.BICUBIC)) for c in range(3)], -1)
    x = torch.from_numpy(u8).permute(2, 0, 1)[None].double()
    ours = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(ours.numpy() - ref).max() < 1e-3


def test_output_sizes_and_crop_offsets():
    assert resize_shortest_edge_size(300, 451, 224) == (224, 336)
    assert resize_shortest_edge_size(451, 300, 224) == (336, 224)
    assert resize_shortest_edge_size(224, 500, 224) == (224, 500)
    x = torch.rand(2, 3, 40, 64)
    out = ClipPreprocess(size=16, crop=(16, 16))(x)
    assert out.shape == (2, 3, 16, 16)
    small = ClipPreprocess(size=8, crop=(10, 10))(torch.rand(1, 3, 8, 8))  # crop larger than image: zero padding
    assert small.shape == (1, 3, 10, 10)


def test_gradcheck():
    pre = ClipPreprocess(size=6, crop=(6, 6))
    x = torch.rand(1, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pre(t), (x,))


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ClipPreprocess()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        ClipPreprocess()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_text_cache_counts_and_evicts():
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((4,), float(len(p))) for p in prompts])

    cache = TextFeatureCache(encode, max_entries=3)
    out = cache(["a", "bb", "a"])
    assert out.shape == (3, 4) and calls == [["a", "bb"]]
    assert (cache.hits, cache.misses) == (1, 2)
    cache(["bb", "ccc"])
    assert calls[-1] == ["ccc"] and len(cache) == 3
    cache(["dddd"])  # evicts the least recently used ("a")
    assert len(cache) == 3
    cache(["a"])
    assert calls[-1] == ["a"]
