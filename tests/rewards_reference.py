"""Reference image transforms and CLIP BPE tokenizer, written from the official transforms' documented definitions
(not from our package), for the reward tests.

Images here are numpy arrays [H, W, 3]; `resample(array, out_h, out_w)` is the bicubic resize to use, so one
geometry can be checked with PIL's uint8 path (what the official PIL transforms run), PIL's float ("F" mode) path
(the same filter without rounding) or torch's anti-aliased bicubic (what torchvision runs on tensors).

* transformers `CLIPImageProcessor` (CLIP score, PickScore): shortest edge to `size` (long edge
  `int(size * long / short)`), `center_crop` at `top = (h - crop_h) // 2`, `left = (w - crop_w) // 2`.
* torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` (OpenAI CLIP's and ImageReward's `_transform`): the
  image is rescaled to `(size * height / width, size)` when height > width (and symmetrically), truncated to
  int; the crop starts at `int(round((h - crop_h) / 2.))`, Python's round (half to even).
* open_clip `ResizeMaxSize(size)` (HPSv2, `light_augmentation=True`): `scale = size / max(h, w)`; unless the
  scale is 1, resize to `round(h * scale), round(w * scale)`, then pad (fill 0) left / top / right / bottom by
  `pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2`. It runs after `ToTensor()`, on floats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
Resample = Callable[[np.ndarray, int, int], np.ndarray]


# ============================================================================================== resampling
def pil_uint8(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [oh, ow, 3] through PIL's RGB bicubic (rounded and clipped after each pass)."""
    from PIL import Image

    if img.shape[:2] == (oh, ow):  # torchvision returns the image untouched when the size does not change
        return img
    return np.asarray(Image.fromarray(img, mode="RGB").resize((ow, oh), resample=Image.BICUBIC))


def pil_float(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """float [H, W, 3] -> float64 [oh, ow, 3], PIL's bicubic per channel in "F" mode: no rounding, no clipping."""
    from PIL import Image

    if img.shape[:2] == (oh, ow):
        return img.astype(np.float64)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                        .resize((ow, oh), resample=Image.BICUBIC)) for c in range(3)]
    return np.stack(chans, -1).astype(np.float64)


def torch_aa(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """What torchvision >= 0.17 runs for `F.resize(tensor, [oh, ow], BICUBIC)` (antialias=True by default)."""
    if img.shape[:2] == (oh, ow):
        return img
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


# ============================================================================================== geometry
def shortest_edge(h: int, w: int, size: int) -> tuple[int, int]:
    if h > w:
        return int(size * h / w), size
    return size, int(size * w / h)


def transformers_offset(n: int, c: int) -> int:
    return (n - c) // 2


def torchvision_offset(n: int, c: int) -> int:
    return int(round((n - c) / 2.0))


def max_size_geometry(h: int, w: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """((new h, new w), (left, top, right, bottom) padding) of open_clip's ResizeMaxSize."""
    scale = size / float(max(h, w))
    if scale == 1.0:
        return (h, w), (0, 0, 0, 0)
    nh, nw = round(h * scale), round(w * scale)
    ph, pw = size - nh, size - nw
    return (nh, nw), (pw // 2, ph // 2, pw - pw // 2, ph - ph // 2)


# ============================================================================================== transforms
def _normalise(px01: np.ndarray) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> normalised [1, 3, H, W], in the pixels' float type (Normalize: sub mean, div std)."""
    mean, std = CLIP_MEAN.astype(px01.dtype), CLIP_STD.astype(px01.dtype)
    return torch.from_numpy((px01 - mean) / std).permute(2, 0, 1)[None]


def _scale01(a: np.ndarray) -> np.ndarray:
    """ToTensor: uint8 -> float32 / 255; floats stay as they are."""
    return a.astype(np.float32) / np.float32(255) if a.dtype == np.uint8 else a


def resize_then_crop(img: np.ndarray, size: int, crop: int, offset: Callable[[int, int], int],
                     resample: Resample) -> torch.Tensor:
    """Shortest edge to `size`, then a `crop` x `crop` window at `offset`; pixels / 255 if uint8, normalised."""
    h, w = img.shape[:2]
    oh, ow = shortest_edge(h, w, size)
    r = resample(img, oh, ow)
    top, left = offset(oh, crop), offset(ow, crop)
    return _normalise(_scale01(r[top:top + crop, left:left + crop]))


def resize_max_size(img: np.ndarray, size: int, resample: Resample = torch_aa) -> torch.Tensor:
    """open_clip's ToTensor -> ResizeMaxSize(size) -> Normalize, on [H, W, 3] uint8 or floats in [0, 1]."""
    x = _scale01(img)  # ToTensor comes first in HPSv2's eval transform: the resize sees floats
    (nh, nw), (left, top, right, bottom) = max_size_geometry(*x.shape[:2], size)
    canvas = np.zeros((top + nh + bottom, left + nw + right, 3), dtype=x.dtype)
    canvas[top:top + nh, left:left + nw] = resample(x, nh, nw)
    return _normalise(canvas)


# ============================================================================================== CLIP BPE
def _byte_alphabet() -> dict[int, str]:
    """CLIP's reversible byte -> unicode map: printable Latin-1 bytes stand for themselves, the rest go to 256+."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_bpe_tokenizer(folder: Path, words: list[str]) -> dict[str, int]:
    """vocab.json + merges.txt (the files of a CLIP tokenizer) with every byte, every byte + "</w>", and merges that
    build each of `words` (lower-case ASCII) left to right; <|endoftext|> is the highest id, as in CLIP."""
    alphabet = list(_byte_alphabet().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in words:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def bpe_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """OpenAI CLIP's SimpleTokenizer on already cleaned text: split into words (letters runs, single digits, runs
    of other non-space characters, English contractions), map each word's UTF-8 bytes through the byte alphabet,
    mark its end with "</w>", merge the best-ranked adjacent pair until none is in the merge table."""
    import regex

    rank = {pair: i for i, pair in enumerate(merges)}
    alphabet = _byte_alphabet()
    ids = []
    for word in regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text,
                              regex.IGNORECASE):
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:], strict=False), key=lambda pair: rank.get(pair, len(rank)))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(symbols):  # every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids.extend(vocab[s] for s in symbols)
    return ids


def read_merges(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / "merges.txt").read_text().splitlines()[1:]
    return [tuple(line.split(" ")) for line in lines if line]  # type: ignore[misc]
