"""HPS v2 / v2.1 (Human Preference Score v2, Wu et al. 2023) on transformers' CLIPModel, from local files only.

HPSv2 is an open_clip ViT-H-14 (laion2B-s32B-b79K) fine-tuned on human preferences; its checkpoints
(`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`, from the Hugging Face repo xswu/HPSv2) hold an open_clip
state dict under "state_dict". open_clip is not needed: `openclip_to_hf` renames the keys to transformers'
CLIPModel layout (fused attention in_proj -> q/k/v projections, class / positional embeddings, ln_pre / ln_post,
transposed visual and text projections); the architecture (widths, depths, patch and image size, context
length, vocabulary) is read from the tensor shapes. Head counts are not in a state dict: the open_clip configs
give 16 for both towers of ViT-H-14 (head width 80 for the 1280-wide vision tower, 64 for the text tower);
other widths use width // 64 unless `vision_heads` / `text_heads` are passed.

Score, as the official `hpsv2.score` (tgxs002/HPSv2, hpsv2/img_score.py): cos(image features, text features) of
the normalised embeddings, times 100 (`scale="percent"`, the unit of the HPSv2 benchmark tables, about 25-30 for
good images) or the raw cosine (`scale="cosine"`, what `hpsv2.score` returns).

Preprocessing: the official `hpsv2.score` builds its transform with `light_augmentation=True`, which is HPSv2's
open_clip `image_transform(224, is_train=False, resize_longest_max=True)`: `ToTensor()`, then `ResizeMaxSize(224)`
on the float tensor (longest side to 224, bicubic, each side `round(side * 224 / longest)`; torchvision >= 0.17
anti-aliases tensors), black padding to 224 x 224 (`pad // 2` left / top), then the OpenAI CLIP mean / std.
`ClipPreprocess.resize_max_size` does the same on tensors (differentiable); the one difference: an image whose
longest side is already 224 but which is not square is padded here, where `ResizeMaxSize` returns it unpadded and
the ViT then fails on it.

Tokenizer: open_clip's SimpleTokenizer is OpenAI CLIP's byte-level BPE (49408 tokens, context 77, start / end
tokens 49406 / 49407, zero padding) after `openclip_clean`: ftfy.fix_text, html.unescape twice, whitespace
collapsed and stripped, lower-cased. transformers' CLIPTokenizer with the same vocab.json + merges.txt (or
tokenizer.json) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K or openai/clip-vit-large-patch14, run on the cleaned
text, gives the same ids up to the pad token, which the causal text tower never lets reach the pooled end-of-text
position. ftfy is used when installed; without it, what only ftfy fixes (mojibake, curly quotes, ligatures,
full-width forms) is left as typed. The tokenizer is read from the HPSv2 folder, else from <models>/rewards/clip/.
"""

from __future__ import annotations

import functools
import html
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip import ClipTower, _check_batch, _transformers
from .convert import load_state_dict
from .hf_build import build_without_init
from .paths import missing, models_dir, reward_path
from .preprocess import ClipPreprocess

PathLike = str | os.PathLike[str]
HPS_FILES = ("HPS_v2.1_compressed.safetensors", "HPS_v2.1_compressed.pt", "HPS_v2_compressed.safetensors",
             "HPS_v2_compressed.pt")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_KNOWN_HEADS = {1280: 16, 1024: 16, 768: 12, 1664: 16, 512: 8}  # open_clip ViT-H/L/B/bigG vision, text widths


@functools.cache
def _ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:  # optional here (open_clip requires it); transformers' tokenizer still applies NFC
        return None
    return ftfy.fix_text


def openclip_clean(text: str) -> str:
    """open_clip's SimpleTokenizer text cleaning: whitespace_clean(basic_clean(text)).lower()."""
    fix_text = _ftfy_fix_text()
    if fix_text is not None:
        text = fix_text(text)
    # twice, as open_clip: prompts scraped from HTML are often escaped twice ("&amp;lt;")
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _heads(width: int, given: int | None, tower: str) -> int:
    heads = given if given is not None else _KNOWN_HEADS.get(width, width // 64)
    if heads < 1 or width % heads:
        raise ValueError(f"{tower} tower of width {width}: cannot split into {heads} attention heads; pass "
                         f"{tower}_heads=")
    return heads


def openclip_to_hf(sd: dict[str, torch.Tensor], *, vision_heads: int | None = None, text_heads: int | None = None,
                   quick_gelu: bool = False, eos_token_id: int | None = None) -> tuple[dict[str, Any],
                                                                                         dict[str, torch.Tensor]]:
    """(CLIPConfig kwargs, CLIPModel state dict) from an open_clip CLIP (ViT vision tower, built-in text tower)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    need = ("visual.conv1.weight", "visual.class_embedding", "visual.proj", "token_embedding.weight",
            "text_projection", "positional_embedding")
    absent = [k for k in need if k not in sd]
    if absent:
        hint = " (a timm or HF-text open_clip model is not supported)" if "visual.trunk" in " ".join(sd) else ""
        raise ValueError(f"not an open_clip ViT CLIP state dict: missing {', '.join(absent)}{hint}; "
                         f"first keys: {sorted(sd)[:6]}")
    out: dict[str, torch.Tensor] = {}
    layers = {"visual.": set(), "": set()}
    for key, t in sd.items():
        if key in ("attn_mask", "visual.attn_mask") or key.endswith(".attn_mask"):
            continue  # a buffer some versions save; rebuilt by the model
        m = _BLOCK.match(key)
        if m is not None:
            prefix, i, rest = m[1] or "", int(m[2]), m[3]
            layers[prefix].add(i)
            base = f"{'vision_model' if prefix else 'text_model'}.encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                    out[base + f"self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = part.contiguous()
                continue
            mod, _, leaf = rest.rpartition(".")
            if mod not in _BLOCK_NAMES:
                raise ValueError(f"unexpected open_clip key {key!r} (layer scale, attention norms and other "
                                 "variants are not supported)")
            out[base + f"{_BLOCK_NAMES[mod]}.{leaf}"] = t
        elif key == "visual.proj":
            out["visual_projection.weight"] = t.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()
        elif key in _TOP:
            out[_TOP[key]] = t
        else:
            raise ValueError(f"unexpected open_clip key {key!r}")
    v_width = int(sd["visual.class_embedding"].shape[0])
    patch = int(sd["visual.conv1.weight"].shape[-1])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise ValueError("visual.positional_embedding is not 1 + grid^2 positions (non-square inputs unsupported)")
    t_width = int(sd["token_embedding.weight"].shape[1])
    vocab = int(sd["token_embedding.weight"].shape[0])
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = {"hidden_size": v_width, "num_hidden_layers": len(layers["visual."]), "patch_size": patch,
              "image_size": grid * patch, "hidden_act": act, "num_attention_heads": _heads(v_width, vision_heads,
                                                                                           "vision"),
              "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])}
    text = {"hidden_size": t_width, "num_hidden_layers": len(layers[""]), "vocab_size": vocab,
            "max_position_embeddings": int(sd["positional_embedding"].shape[0]), "hidden_act": act,
            "num_attention_heads": _heads(t_width, text_heads, "text"),
            "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            # open_clip pools at argmax(ids): the end-of-text token is the highest id of its vocabulary
            "eos_token_id": int(eos_token_id if eos_token_id is not None else vocab - 1),
            "bos_token_id": int(vocab - 2), "pad_token_id": 0}
    for k in ("num_hidden_layers",):
        if not vision[k] or not text[k]:
            raise ValueError("the state dict has no transformer blocks")
    config = {"vision_config": vision, "text_config": text, "projection_dim": int(sd["text_projection"].shape[1])}
    return config, out


def build_clip_model(config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """A transformers CLIPModel holding `state` (strict), built without a random initialisation."""
    tf = _transformers()
    dtype = next(iter(state.values())).dtype
    model = build_without_init(tf.CLIPModel, tf.CLIPConfig(**config), state, "converted HPSv2 (CLIPModel)")
    return model.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)


class HPSv2Score(nn.Module):
    """100 * cos(image, text) (scale="percent", the HPSv2 benchmark unit) or the cosine (scale="cosine")."""

    name = "hpsv2"

    def __init__(self, tower: ClipTower, scale: str = "percent") -> None:
        super().__init__()
        if scale not in ("percent", "cosine"):
            raise ValueError(f"scale must be 'percent' or 'cosine', got {scale!r}")
        self.tower = tower
        self.scale = scale

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        cos = (self.tower.image_features(images) * self.tower.text_features(prompts)).sum(dim=-1)
        return 100.0 * cos if self.scale == "percent" else cos


def _tokenizer_dir(folder: Path, tokenizer_path: PathLike | None, models: PathLike | None) -> Path:
    candidates = [Path(tokenizer_path)] if tokenizer_path is not None else [folder]
    if tokenizer_path is None:
        base = models_dir(models)
        if base is not None:
            candidates.append(base / "rewards" / "clip")
    for c in candidates:
        if (c / "tokenizer.json").is_file() or ((c / "vocab.json").is_file() and (c / "merges.txt").is_file()):
            return c
    raise missing("hpsv2", candidates[0] / "vocab.json",
                  "CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json, of "
                  "laion/CLIP-ViT-H-14-laion2B-s32B-b79K or openai/clip-vit-large-patch14; also looked in "
                  f"{', '.join(str(c) for c in candidates[1:]) or 'no other folder'})")


def find_hps_file(path: Path) -> Path:
    if path.is_dir() or (not path.exists() and path.suffix not in (".pt", ".pth", ".bin", ".safetensors")):
        found = [path / f for f in HPS_FILES if (path / f).is_file()]
        if not found:
            raise missing("hpsv2", path / HPS_FILES[1], "HPSv2 checkpoint (one of " + ", ".join(HPS_FILES) + ")")
        return found[0]
    if not path.is_file():
        raise missing("hpsv2", path, "HPSv2 checkpoint")
    return path


def load_hpsv2(path: PathLike | None = None, *, models_dir: PathLike | None = None, scale: str = "percent",
               tokenizer_path: PathLike | None = None, vision_heads: int | None = None,
               text_heads: int | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", gradient_checkpointing: bool = False,
               cache_size: int = 4096, clamp_preprocess: bool = False) -> HPSv2Score:
    """HPSv2 from a checkpoint file (.pt read with weights_only=True, or .safetensors) or a folder holding one of
    HPS_FILES (default <models>/rewards/hpsv2/)."""
    p = reward_path("hpsv2", path, models_dir)
    file = find_hps_file(p)
    folder = file.parent
    tok_dir = _tokenizer_dir(folder, tokenizer_path, models_dir)
    tf = _transformers()
    tokenizer = tf.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    config, state = openclip_to_hf(load_state_dict(file), vision_heads=vision_heads, text_heads=text_heads,
                                   eos_token_id=tokenizer.eos_token_id)
    if config["text_config"]["vocab_size"] != len(tokenizer):
        raise ValueError(f"{file}: the text tower has {config['text_config']['vocab_size']} tokens, the tokenizer in "
                         f"{tok_dir} {len(tokenizer)}")
    model = build_clip_model(config, state)
    size = int(config["vision_config"]["image_size"])
    pre = ClipPreprocess.resize_max_size(size, clamp=clamp_preprocess)
    tower = ClipTower(model.to(device), tokenizer, pre, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                      cache_size=cache_size, text_clean=openclip_clean)
    return HPSv2Score(tower, scale)
