"""Tiny random reward models written in the same on-disk formats users load (tests, demos, timing).

`write_tiny_clip(folder)` saves a randomly initialised CLIPModel (save_pretrained, safetensors), a byte-level
CLIP tokenizer (no merges: one token per byte) and a preprocessor_config.json; `write_tiny_aesthetic_head(file)`
saves a random aesthetic head. They load back through `load_clip_score`, `load_pickscore`, `load_aesthetic`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .clip import AestheticHead, _transformers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_clip_vocab() -> dict[str, int]:
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513  # highest id, as in CLIP (pooling may take argmax of the ids)
    return vocab


def write_tiny_clip(folder: str | os.PathLike[str], *, seed: int = 0, hidden: int = 32, layers: int = 2,
                    heads: int = 2, projection_dim: int = 16, image_size: int = 32, patch_size: int = 8,
                    max_text_len: int = 16, hidden_act: str = "quick_gelu", logit_scale: float = 4.6052) -> Path:
    """Writes a tiny random CLIPModel folder (config.json, model.safetensors, tokenizer, preprocessor_config.json)."""
    tf = _transformers()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_clip_vocab()
    common: dict[str, Any] = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                              "num_attention_heads": heads, "hidden_act": hidden_act}
    text = dict(common, vocab_size=len(vocab), max_position_embeddings=max_text_len, bos_token_id=512,
                eos_token_id=513, pad_token_id=513)
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                           logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    model = tf.CLIPModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tok = tf.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_text_len)
    tok.save_pretrained(str(folder))
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "do_convert_rgb": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return folder


def write_tiny_aesthetic_head(path: str | os.PathLike[str], input_size: int = 16, seed: int = 0,
                              fmt: str = "safetensors") -> Path:
    """A random aesthetic head saved as .safetensors (fmt="safetensors") or as a legacy pickle (fmt="pth")."""
    torch.manual_seed(seed)
    head = AestheticHead(input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in head.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "pth":
        torch.save(sd, str(path))
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'pth', got {fmt!r}")
    return path
