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


TINY_BERT_WORDS = ("a", "an", "the", "red", "blue", "green", "cat", "dog", "car", "on", "in", "of", "photo", "at",
                   "night", "beach", "two", "big", "small", "tree")


def write_tiny_bert_tokenizer(folder: str | os.PathLike[str]) -> Path:
    """A bert-base-uncased-style WordPiece vocab.txt: the special tokens, some words, and every letter / digit
    (as word starts and ## pieces), so any lower-case ASCII prompt tokenizes without [UNK] for letters."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS, *chars,
                                 *(f"##{c}" for c in chars), ".", ",", "!", "?", "'", "-"]))
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return folder


def tiny_imagereward_state_dict(*, seed: int = 0, vision_width: int = 64, vision_layers: int = 2,
                                image_size: int = 32, patch_size: int = 8, text_width: int = 32, text_layers: int = 2,
                                vocab_size: int = 100, max_positions: int = 40) -> dict[str, torch.Tensor]:
    """Random tensors in the key layout and shapes of THUDM's ImageReward.pt (BLIP ViT + BERT with cross-attention +
    MLP head), at a tiny size. LayerNorm weights are kept near 1 and projections scaled like an initialised model."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * s

    def ln(prefix: str, width: int, weight: str = "weight", bias: str = "bias") -> dict[str, torch.Tensor]:
        return {f"{prefix}.{weight}": 1 + rnd(width, scale=0.1), f"{prefix}.{bias}": rnd(width, scale=0.1)}

    def linear(prefix: str, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": rnd(n_out, n_in), f"{prefix}.bias": rnd(n_out, scale=0.02)}

    v, t = vision_width, text_width
    sd: dict[str, torch.Tensor] = {}
    p = "blip.visual_encoder."
    n_patch = (image_size // patch_size) ** 2
    sd[p + "cls_token"] = rnd(1, 1, v, scale=0.2)
    sd[p + "pos_embed"] = rnd(1, n_patch + 1, v, scale=0.2)
    sd[p + "patch_embed.proj.weight"] = rnd(v, 3, patch_size, patch_size, scale=(3 * patch_size**2) ** -0.5)
    sd[p + "patch_embed.proj.bias"] = rnd(v, scale=0.02)
    for i in range(vision_layers):
        b = f"{p}blocks.{i}."
        sd |= ln(b + "norm1", v) | linear(b + "attn.qkv", 3 * v, v) | linear(b + "attn.proj", v, v)
        sd |= ln(b + "norm2", v) | linear(b + "mlp.fc1", 4 * v, v) | linear(b + "mlp.fc2", v, 4 * v)
    sd |= ln(p + "norm", v)
    p = "blip.text_encoder."
    sd[p + "embeddings.word_embeddings.weight"] = rnd(vocab_size, t, scale=0.5)
    sd[p + "embeddings.position_embeddings.weight"] = rnd(max_positions, t, scale=0.2)
    sd[p + "embeddings.position_ids"] = torch.arange(max_positions)[None]  # saved by BLIP's BERT code
    sd |= ln(p + "embeddings.LayerNorm", t)
    for i in range(text_layers):
        b = f"{p}encoder.layer.{i}."
        for kind, kv_in in (("attention", t), ("crossattention", v)):
            sd |= linear(f"{b}{kind}.self.query", t, t) | linear(f"{b}{kind}.self.key", t, kv_in)
            sd |= linear(f"{b}{kind}.self.value", t, kv_in) | linear(f"{b}{kind}.output.dense", t, t)
            sd |= ln(f"{b}{kind}.output.LayerNorm", t)
        sd |= linear(b + "intermediate.dense", 4 * t, t) | linear(b + "output.dense", t, 4 * t)
        sd |= ln(b + "output.LayerNorm", t)
    sd |= linear("blip.vision_proj", 16, v) | linear("blip.text_proj", 16, t)  # unused by the score
    for name, (n_out, n_in) in {"0": (1024, t), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}.items():
        sd |= linear(f"mlp.layers.{name}", n_out, n_in)
    return {k: v.contiguous() for k, v in sd.items()}


def write_tiny_imagereward(folder: str | os.PathLike[str], *, seed: int = 0, fmt: str = "pt",
                           text_heads: int = 2, **sizes: int) -> Path:
    """<folder>/ImageReward.pt (or .safetensors) in the original key layout + med_config.json + tokenizer/."""
    folder = Path(folder)
    tok_dir = write_tiny_bert_tokenizer(folder / "tokenizer")
    vocab = len((tok_dir / "vocab.txt").read_text().split()) + 2  # + [DEC], [ENC] as in BLIP
    sd = tiny_imagereward_state_dict(seed=seed, vocab_size=vocab, **sizes)
    width = int(sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape[1])
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": width,
           "intermediate_size": 4 * width, "layer_norm_eps": 1e-12, "model_type": "bert",
           "num_attention_heads": text_heads, "pad_token_id": 0, "vocab_size": vocab, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    if fmt == "pt":
        torch.save(sd, folder / "ImageReward.pt")
        return folder / "ImageReward.pt"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "ImageReward.safetensors"))
        return folder / "ImageReward.safetensors"
    raise ValueError(f"fmt must be 'pt' or 'safetensors', got {fmt!r}")


def tiny_openclip_state_dict(*, seed: int = 0, vision_width: int = 128, vision_layers: int = 2, image_size: int = 32,
                             patch_size: int = 8, text_width: int = 128, text_layers: int = 2, vocab_size: int = 514,
                             context: int = 16, embed_dim: int = 24) -> dict[str, torch.Tensor]:
    """Random tensors in the key layout of an open_clip CLIP (ViT vision tower, built-in text tower), the layout of
    the HPSv2 checkpoints, at a tiny size. Head counts follow open_clip's width // 64 (2 heads at width 128)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * s

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = rnd(3 * width, width), rnd(3 * width)
            sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = rnd(width, width), rnd(width)
            sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = rnd(4 * width, width), rnd(4 * width)
            sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = rnd(width, 4 * width), rnd(width)
        return sd

    v, t = vision_width, text_width
    sd = {"visual.class_embedding": rnd(v, scale=v**-0.5),
          "visual.positional_embedding": rnd((image_size // patch_size) ** 2 + 1, v, scale=v**-0.5),
          "visual.conv1.weight": rnd(v, 3, patch_size, patch_size, scale=(3 * patch_size**2) ** -0.5),
          "visual.ln_pre.weight": 1 + rnd(v), "visual.ln_pre.bias": rnd(v),
          **blocks("visual.", v, vision_layers),
          "visual.ln_post.weight": 1 + rnd(v), "visual.ln_post.bias": rnd(v),
          "visual.proj": rnd(v, embed_dim, scale=v**-0.5),
          "token_embedding.weight": rnd(vocab_size, t, scale=0.02), "positional_embedding": rnd(context, t, scale=0.01),
          **blocks("", t, text_layers),
          "ln_final.weight": 1 + rnd(t), "ln_final.bias": rnd(t),
          "text_projection": rnd(t, embed_dim, scale=t**-0.5), "logit_scale": torch.tensor(4.6052)}
    return {k: x.contiguous() for k, x in sd.items()}


def write_tiny_hpsv2(folder: str | os.PathLike[str], *, seed: int = 0, fmt: str = "pt") -> Path:
    """<folder>/HPS_v2.1_compressed.pt ({"state_dict": ...}, as released) or .safetensors, plus the tiny CLIP
    tokenizer files (vocab.json + merges.txt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tf = _transformers()
    tf.CLIPTokenizer(vocab=tiny_clip_vocab(), merges=[], model_max_length=16).save_pretrained(str(folder))
    sd = tiny_openclip_state_dict(seed=seed)
    if fmt == "pt":
        torch.save({"state_dict": sd, "epoch": 1}, folder / "HPS_v2.1_compressed.pt")
        return folder / "HPS_v2.1_compressed.pt"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "HPS_v2.1_compressed.safetensors"))
        return folder / "HPS_v2.1_compressed.safetensors"
    raise ValueError(f"fmt must be 'pt' or 'safetensors', got {fmt!r}")
