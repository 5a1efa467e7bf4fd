"""Tensor CLIP preprocessing vs each reward's official transform, over many image sizes, and the text-feature cache.

The official transforms are rewritten in rewards_reference.py from their documented definitions (transformers'
CLIPImageProcessor for CLIP score / PickScore; torchvision Resize + CenterCrop for ImageReward and the aesthetic
predictor; open_clip's ResizeMaxSize for HPSv2). Tolerances (pixel units, 1 grey level = 1/255, compared before
normalisation):
* geometry and filter, against PIL's float ("F" mode) bicubic, which has no rounding, in float64: max 1e-3 grey
  levels. A crop or padding one pixel off gives tens of grey levels on the white-noise images used there;
* HPSv2 against open_clip's tensor path (ToTensor, then torchvision's resize of the float tensor, which is torch's
  anti-aliased bicubic, pad, normalise), float32 as the official: max 1e-6 after normalisation (float32 noise);
* against the PIL-on-uint8 paths (CLIPImageProcessor; torchvision on a PIL image, as ImageReward's and OpenAI
  CLIP's `_transform`): PIL runs two separable passes, rounds after each one to uint8 and clips the bicubic
  overshoot to [0, 255] between them, which a differentiable path must not do. Smooth images: max 1.5 and mean 0.5
  grey levels; white-noise images: mean 0.6 grey levels (single pixels up to ~40 levels, where PIL clips).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rewards_reference as ref
import torch
import torch.nn.functional as F

from diffinstruct.rewards import CLIP_STD, ClipPreprocess, TextFeatureCache
from diffinstruct.rewards.preprocess import centre_window, resize_longest_edge_size, resize_shortest_edge_size

# (height, width): square, SDXL landscape / portrait, small and odd sizes; (832, 1216), (512, 538), (538, 512) have
# (resized long side - 224) = 3 mod 4, where torchvision's rounded crop offset is one pixel past the floor
SIZES = [(224, 224), (512, 512), (1024, 1024), (832, 1216), (1216, 832), (300, 200), (200, 300), (512, 538),
         (538, 512), (64, 64), (331, 225), (225, 331), (300, 451), (640, 360), (60, 100)]
OFF_BY_ONE = [(832, 1216), (1216, 832), (512, 538), (538, 512)]


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


def _official(style: str, img: np.ndarray, resample) -> torch.Tensor:
    if style == "hpsv2":
        return ref.resize_max_size(img, 224, resample)
    offset = ref.torchvision_offset if style == "torchvision" else ref.transformers_offset
    return ref.resize_then_crop(img, 224, 224, offset, resample)


OURS = {"transformers": ClipPreprocess(), "torchvision": ClipPreprocess.torchvision(224),
        "hpsv2": ClipPreprocess.resize_max_size(224)}


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("style", ["transformers", "torchvision", "hpsv2"])
def test_geometry_and_filter_match_the_official_definition(hw, style):
    u8 = _uint8_image(*hw, smooth=False, seed=hw[0] + 3 * hw[1])  # noise: any pixel shift shows
    want = _official(style, u8.astype(np.float64) / 255, ref.pil_float)
    got = OURS[style](_to_tensor(u8).double())
    assert got.shape == want.shape == (1, 3, 224, 224)
    assert float(_grey_levels(got, want).max()) < 1e-3


@pytest.mark.parametrize("hw", OFF_BY_ONE)
def test_the_two_crop_conventions_are_one_pixel_apart_here(hw):
    """What the geometry test tells apart: the floor (transformers) and torchvision's rounded offset."""
    long_side = max(resize_shortest_edge_size(*hw, 224))
    assert (long_side - 224) % 4 == 3
    assert ref.torchvision_offset(long_side, 224) == ref.transformers_offset(long_side, 224) + 1
    x = _to_tensor(_uint8_image(*hw, smooth=False, seed=3)).double()
    assert float(_grey_levels(OURS["transformers"](x), OURS["torchvision"](x)).mean()) > 10


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("smooth", [True, False])
def test_torchvision_style_matches_the_pil_transform(hw, smooth):
    """ImageReward's and OpenAI CLIP's `_transform`: Resize + CenterCrop on the PIL image, ToTensor, Normalize."""
    u8 = _uint8_image(*hw, smooth=smooth, seed=hw[0] * 5 + hw[1])
    d = _grey_levels(OURS["torchvision"](_to_tensor(u8)), _official("torchvision", u8, ref.pil_uint8))
    if hw == (224, 224):
        assert float(d.max()) < 1e-3
    elif smooth:
        assert float(d.max()) <= 1.5 and float(d.mean()) <= 0.5
    else:
        assert float(d.mean()) <= 0.6


@pytest.mark.parametrize("hw", SIZES)
def test_hpsv2_is_open_clips_tensor_transform(hw):
    """HPSv2's eval transform resizes the float32 tensor ToTensor made: the same computation here, float32 noise."""
    u8 = _uint8_image(*hw, smooth=True, seed=hw[0] + hw[1])
    x = torch.from_numpy(u8).permute(2, 0, 1)[None].float().div(255)  # ToTensor
    want = ref.resize_max_size(u8, 224)
    got = OURS["hpsv2"](x)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (1, 3, 224, 224)
    assert float((got - want).abs().max()) <= 1e-6
    (_, _), (left, top, right, bottom) = ref.max_size_geometry(*hw, 224)
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (ref.CLIP_MEAN, ref.CLIP_STD))
    black = ((torch.zeros(3) - mean) / std).view(3, 1, 1)
    if top + bottom:  # the padding is black before normalisation
        assert torch.equal(got[0, :, :top], black.expand(3, top, 224))
        assert torch.equal(got[0, :, 224 - bottom:], black.expand(3, bottom, 224))
    if left + right:
        assert torch.equal(got[0, :, :, :left], black.expand(3, 224, left))


def test_hpsv2_pads_an_image_whose_longest_side_is_already_224():
    """ResizeMaxSize leaves it unpadded (the ViT then refuses it); here it is padded, the image itself unchanged."""
    u8 = _uint8_image(100, 224, smooth=True, seed=9)
    official = ref.resize_max_size(u8, 224)
    assert official.shape == (1, 3, 100, 224)
    got = OURS["hpsv2"](torch.from_numpy(u8).permute(2, 0, 1)[None].float().div(255))
    assert got.shape == (1, 3, 224, 224)
    assert float((got[..., 62:162, :] - official).abs().max()) <= 1e-6


def test_geometry_over_many_sizes():
    for n in range(224, 400):
        assert centre_window(n, 224, "torchvision")[2] == ref.torchvision_offset(n, 224), n
        assert centre_window(n, 224, "transformers")[2] == ref.transformers_offset(n, 224), n
    for h in [*range(1, 40), *range(200, 260), 331, 538, 832, 1216, 2048]:
        for w in (1, 7, 64, 200, 224, 225, 300, 448, 512, 538, 832, 1216):
            assert resize_shortest_edge_size(h, w, 224) == ref.shortest_edge(h, w, 224), (h, w)
            if 224 * min(h, w) >= max(h, w) // 2 + 1:  # not so elongated that a side would round to 0
                assert resize_longest_edge_size(h, w, 224) == ref.max_size_geometry(h, w, 224)[0], (h, w)
                (oh, ow), pad, _ = OURS["hpsv2"].output_geometry(h, w)
                want_size, (left, top, right, bottom) = ref.max_size_geometry(h, w, 224)
                if want_size != (h, w):
                    assert pad == (left, right, top, bottom), (h, w)


def test_geometry_worked_examples():
    # SDXL 1216 wide x 832 high. ResizeMaxSize: height round(832 * 224 / 1216) = round(153.26) = 153, 71 rows of
    # padding, 35 on top and 36 below
    assert OURS["hpsv2"].output_geometry(832, 1216) == ((153, 224), (0, 0, 35, 36), (0, 0))
    # shortest side 832 -> 224, 1216 -> int(327.38) = 327: 103 spare columns, floor 51, round(51.5) = 52
    assert OURS["transformers"].output_geometry(832, 1216) == ((224, 327), (0, 0, 0, 0), (0, 51))
    assert OURS["torchvision"].output_geometry(832, 1216) == ((224, 327), (0, 0, 0, 0), (0, 52))
    # Python rounds halves to even: 1, 3, 5, 7 spare pixels -> round(0.5, 1.5, 2.5, 3.5) = 0, 2, 2, 4
    assert [centre_window(224 + d, 224, "torchvision")[2] for d in (1, 3, 5, 7)] == [0, 2, 2, 4]
    assert [centre_window(224 + d, 224, "transformers")[2] for d in (1, 3, 5, 7)] == [0, 1, 2, 3]
    # ResizeMaxSize too: 5 x 448 -> 2.5 -> 2, 7 x 448 -> 3.5 -> 4
    assert resize_longest_edge_size(5, 448, 224) == (2, 224)
    assert resize_longest_edge_size(7, 448, 224) == (4, 224)
    # a crop larger than the image: transformers pads the odd pixel before the image, torchvision after it
    assert centre_window(7, 10, "transformers") == (2, 1, 0)
    assert centre_window(7, 10, "torchvision") == (1, 2, 0)


@pytest.mark.parametrize("hw", [(8, 8), (8, 13), (13, 8)])
def test_crop_larger_than_the_image_pads_as_clip_image_processor(hw):
    """A crop_size above size: CLIPImageProcessor zero-pads the resized image, the odd pixel before it."""
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 11, "width": 11})
    u8 = _uint8_image(*hw, smooth=True, seed=5)
    want = proc(images=[u8], return_tensors="pt")["pixel_values"]
    got = ClipPreprocess(size=8, crop=(11, 11))(_to_tensor(u8))
    assert got.shape == want.shape == (1, 3, 11, 11)
    assert float(_grey_levels(got, want).mean()) <= 0.5  # padding the odd pixel after: ~40 grey levels off


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


@pytest.mark.parametrize(("pre", "hw"), [(ClipPreprocess(size=6, crop=(6, 6)), (9, 7)),
                                         (ClipPreprocess.torchvision(6), (7, 11)),  # 9 columns, offset 2
                                         (ClipPreprocess.resize_max_size(6), (9, 7)),  # down to 6 x 5, padded
                                         (ClipPreprocess.resize_max_size(6), (4, 3))])  # up to 6 x 4, padded
def test_gradcheck(pre, hw):
    x = torch.rand(1, 3, *hw, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pre(t), (x,))


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ClipPreprocess()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        ClipPreprocess()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pads to size x size"):
        ClipPreprocess(size=224, crop=(200, 200), resize="longest")
    with pytest.raises(ValueError, match="crop_style"):
        ClipPreprocess(crop_style="pil")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too elongated"):
        ClipPreprocess.resize_max_size(224)(torch.rand(1, 3, 1, 1000))


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
