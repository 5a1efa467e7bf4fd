"""ImageReward (Xu et al. 2023, THUDM/ImageReward), the DI++ paper's reward, on transformers' BLIP modules.

The checkpoint `ImageReward.pt` (Hugging Face repo THUDM/ImageReward) is a plain state dict with
  blip.visual_encoder.*  BLIP's ViT-L/16 at 224 px (timm layout: patch_embed, cls_token, pos_embed, blocks.i with a
                         fused qkv, final norm; LayerNorm eps 1e-6), -> transformers BlipVisionModel;
  blip.text_encoder.*    BLIP's BERT-base with a cross-attention block in every layer (med.py, vocabulary 30524 =
                         bert-base-uncased + [DEC] + [ENC]), -> transformers BlipTextModel (same key names);
  mlp.layers.*           the 768-1024-128-64-16-1 head (Linear layers, no activations; dropout off at inference);
  blip.vision_proj / blip.text_proj (BLIP's contrastive heads, unused by the score, ignored).

Score, as the official `ImageReward.score` (ImageReward/ImageReward.py):
  ids = bert tokenizer(prompt, padding="max_length", max_length=35, truncation) (first token [CLS]; the official
        inference code does not put BLIP's [ENC] token there),
  h   = text_encoder(ids, mask, encoder_hidden_states=visual_encoder(image)).last_hidden_state[:, 0],
  r   = (mlp(h) - 0.16717362830052426) / 1.0333394966054072.
Preprocessing: the official `_transform(224)` is torchvision's `Resize(224, BICUBIC)` (shortest side to 224, long
side truncated) and `CenterCrop(224)` (offset `int(round((n - 224) / 2))`) on the PIL image, then CLIP mean / std;
`ClipPreprocess.torchvision(224)` does the same on tensors, so the score is differentiable in the image.

Head counts are not stored in a state dict: the text tower's come from med_config.json when it lies beside the
checkpoint (else width // 64 = 12 for BERT-base), the vision tower's are width // 64 (16 for ViT-L) unless
`vision_heads` is given. Tokenizer: bert-base-uncased (vocab.txt) from <folder>/tokenizer/ or <folder>; [DEC] and
[ENC] are added as in BLIP's init_tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip import AestheticHead, _check_batch, _checkpoint_layers, _transformers
from .convert import load_state_dict
from .hf_build import build_without_init
from .paths import missing, reward_path
from .preprocess import ClipPreprocess, at_least_fp32

PathLike = str | os.PathLike[str]
IR_FILES = ("ImageReward.safetensors", "ImageReward.pt")
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35
_VIS_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIS_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def split_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor]]:
    """(BlipVisionModel, BlipTextModel, head) state dicts from an ImageReward checkpoint's keys."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        key = key.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
        if key.endswith("position_ids"):
            continue  # a buffer older BERT code saved; rebuilt by the model
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            m = _BLOCK.match(rest)
            if rest in _VIS_TOP:
                vision[_VIS_TOP[rest]] = t
            elif m is not None and m[2] in _VIS_BLOCK:
                vision[f"encoder.layers.{m[1]}.{_VIS_BLOCK[m[2]]}.{m[3]}"] = t
            else:
                raise ValueError(f"unexpected ImageReward vision key {key!r}")
        elif key.startswith("blip.text_encoder."):
            rest = key.removeprefix("blip.text_encoder.")
            if not rest.startswith("pooler."):  # BLIP builds the text encoder without a pooler
                text[rest] = t
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = t
    for what, part, needle in (("blip.visual_encoder.*", vision, "embeddings.class_embedding"),
                               ("blip.text_encoder.*", text, "embeddings.word_embeddings.weight"),
                               ("mlp.layers.*", head, "layers.0.weight")):
        if needle not in part:
            raise ValueError(f"not an ImageReward checkpoint: no {what} weights (looked for {needle}); first keys: "
                             f"{sorted(sd)[:6]}")
    return vision, text, head


def _count_layers(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in sd if (m := rx.match(k))})


def configs(vision: dict[str, torch.Tensor], text: dict[str, torch.Tensor], med_config: dict[str, Any] | None = None,
            vision_heads: int | None = None, text_heads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """BlipVisionConfig and BlipTextConfig kwargs read from the tensor shapes (+ med_config.json if given)."""
    v_width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    n_pos = int(vision["embeddings.position_embedding"].shape[1])
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError("blip.visual_encoder.pos_embed is not 1 + grid^2 positions")
    vh = vision_heads if vision_heads is not None else max(1, v_width // 64)
    v_cfg = {"hidden_size": v_width, "intermediate_size": int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
             "num_hidden_layers": _count_layers(vision, r"^encoder\.layers\.(\d+)\."), "num_attention_heads": vh,
             "image_size": grid * patch, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
    med = dict(med_config or {})
    t_width = int(text["embeddings.word_embeddings.weight"].shape[1])
    th = text_heads if text_heads is not None else int(med.get("num_attention_heads", max(1, t_width // 64)))
    t_cfg = {"vocab_size": int(text["embeddings.word_embeddings.weight"].shape[0]), "hidden_size": t_width,
             "encoder_hidden_size": int(text["encoder.layer.0.crossattention.self.key.weight"].shape[1]),
             "intermediate_size": int(text["encoder.layer.0.intermediate.dense.weight"].shape[0]),
             "num_hidden_layers": _count_layers(text, r"^encoder\.layer\.(\d+)\."), "num_attention_heads": th,
             "max_position_embeddings": int(text["embeddings.position_embeddings.weight"].shape[0]),
             "hidden_act": str(med.get("hidden_act", "gelu")),
             "layer_norm_eps": float(med.get("layer_norm_eps", 1e-12)),
             "pad_token_id": int(med.get("pad_token_id", 0)), "is_decoder": True,  # is_decoder: build cross-attention
             "bos_token_id": None, "sep_token_id": None, "eos_token_id": None}
    for cfg, what in ((v_cfg, "vision"), (t_cfg, "text")):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"{what} width {cfg['hidden_size']} does not split into {cfg['num_attention_heads']} "
                             "heads")
    return v_cfg, t_cfg


class ImageRewardScore(nn.Module):
    """(mlp(BERT-with-cross-attention(prompt, ViT(image))[CLS]) - mean) / std, differentiable in the image."""

    name = "imagereward"

    def __init__(self, vision: nn.Module, text: nn.Module, head: AestheticHead, tokenizer: Any,
                 preprocess: ClipPreprocess, *, dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False, mean: float = MEAN, std: float = STD,
                 max_length: int = MAX_LENGTH, cache_size: int = 4096) -> None:
        super().__init__()
        self.vision = vision.eval().requires_grad_(False).to(dtype)
        self.text = text.eval().requires_grad_(False).to(dtype)
        self.head = head.eval().requires_grad_(False).to(dtype)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.dtype = dtype
        self.mean, self.std, self.max_length = float(mean), float(std), int(max_length)
        self.cache_size = int(cache_size)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> (ids, mask): no image in it
        if gradient_checkpointing:
            _checkpoint_layers(self.vision.encoder.layers)
            _checkpoint_layers(self.text.encoder.layer)

    def train(self, mode: bool = True) -> ImageRewardScore:  # a frozen scorer: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.head.layers[0].weight.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if new:
            tok = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            for i, p in enumerate(new):
                self._tokens[p] = (tok["input_ids"][i], tok["attention_mask"][i])
            while len(self._tokens) > max(self.cache_size, len(prompts)):
                self._tokens.pop(next(iter(self._tokens)))
        ids = torch.stack([self._tokens[p][0] for p in prompts]).to(self.device)
        mask = torch.stack([self._tokens[p][1] for p in prompts]).to(self.device)
        return ids, mask

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        px = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        return self.vision(pixel_values=px).last_hidden_state

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        embeds = self.image_embeds(images)
        ids, mask = self.tokenize([str(p) for p in prompts])
        image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds,
                        encoder_attention_mask=image_mask)
        raw = at_least_fp32(self.head(out.last_hidden_state[:, 0]))
        return (raw - self.mean) / self.std


def find_ir_file(path: Path) -> Path:
    if path.is_dir() or (not path.exists() and path.suffix not in (".pt", ".pth", ".bin", ".safetensors")):
        found = [path / f for f in IR_FILES if (path / f).is_file()]
        if not found:
            raise missing("imagereward", path / IR_FILES[1], "ImageReward checkpoint (ImageReward.pt or "
                                                             "ImageReward.safetensors)")
        return found[0]
    if not path.is_file():
        raise missing("imagereward", path, "ImageReward checkpoint")
    return path


def load_bert_tokenizer(folder: Path, tokenizer_path: PathLike | None = None) -> Any:
    """bert-base-uncased from <folder>/tokenizer/ or <folder> (vocab.txt), with BLIP's [DEC] / [ENC] tokens."""
    candidates = [Path(tokenizer_path)] if tokenizer_path is not None else [folder / "tokenizer", folder]
    tok_dir = next((c for c in candidates if (c / "vocab.txt").is_file() or (c / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        raise missing("imagereward", candidates[0] / "vocab.txt", "bert-base-uncased tokenizer (vocab.txt)")
    tf = _transformers()
    tok = tf.BertTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_imagereward(path: PathLike | None = None, *, models_dir: PathLike | None = None,
                     tokenizer_path: PathLike | None = None, vision_heads: int | None = None,
                     text_heads: int | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", gradient_checkpointing: bool = False,
                     cache_size: int = 4096, clamp_preprocess: bool = False) -> ImageRewardScore:
    """ImageReward from a checkpoint (.pt read with weights_only=True, or .safetensors) or a folder holding one of
    IR_FILES (default <models>/rewards/imagereward/); med_config.json beside it is read when present."""
    file = find_ir_file(reward_path("imagereward", path, models_dir))
    folder = file.parent
    tokenizer = load_bert_tokenizer(folder, tokenizer_path)
    vision_sd, text_sd, head_sd = split_checkpoint(load_state_dict(file))
    med_path = folder / "med_config.json"
    med = json.loads(med_path.read_text()) if med_path.is_file() else None
    v_cfg, t_cfg = configs(vision_sd, text_sd, med, vision_heads, text_heads)
    if t_cfg["vocab_size"] != len(tokenizer):
        raise ValueError(f"{file}: the text encoder has {t_cfg['vocab_size']} tokens, the tokenizer (with [DEC], "
                         f"[ENC]) {len(tokenizer)}")
    tf = _transformers()
    vision = build_without_init(tf.BlipVisionModel, tf.BlipVisionConfig(**v_cfg), vision_sd, "ImageReward vision")
    text = build_without_init(tf.BlipTextModel, tf.BlipTextConfig(**t_cfg), text_sd, "ImageReward text",
                              add_pooling_layer=False)
    head = AestheticHead(int(head_sd["layers.0.weight"].shape[1]))
    head.load_state_dict(head_sd, strict=True)
    size = int(v_cfg["image_size"])
    return ImageRewardScore(vision.to(device), text.to(device), head.to(device), tokenizer,
                            ClipPreprocess.torchvision(size, clamp=clamp_preprocess), dtype=dtype,
                            gradient_checkpointing=gradient_checkpointing, cache_size=cache_size)
