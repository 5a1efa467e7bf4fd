"""CLIP-based reward models on transformers' CLIPModel: CLIP score, PickScore, the LAION aesthetic predictor v2.

All load from local files only (`local_files_only=True`, HF_HUB_OFFLINE=1 set before transformers is imported);
a missing file raises `RewardWeightsNotFound` naming the path and what to put there (see `paths.py`).

Scores (images [B, 3, H, W] in [0, 1], differentiable in the images):

* `ClipScore`: 100 * cos(image, text), clamped at 0 (torchmetrics' / Hessel et al.'s CLIP score without the 2.5
  factor). `clamp=False` keeps the negative part, and its gradient.
* `PickScore`: logit_scale.exp() * cos(image, text) (the official PickScore, about 20-23 on good images).
  `scale="cosine"` gives the raw cosine (about 0.22), the form in which DI++ / DI* papers report it.
* `AestheticScore`: MLP(normalise(CLIP ViT-L/14 image embedding)), the LAION improved aesthetic predictor v2
  (layers 768-1024-128-64-16-1, all Linear, no activations; dropout inactive at inference).

Preprocessing (`ClipPreprocess`, on tensors): CLIP score and PickScore as transformers' `CLIPProcessor` (their
official scorers: torchmetrics, the PickScore README), centre crop at `(n - 224) // 2`; the aesthetic predictor as
OpenAI CLIP's `preprocess` (torchvision `Resize` + `CenterCrop`, offset `int(round((n - 224) / 2))`).

Options on every model: `dtype` (torch.bfloat16 halves memory; features are returned in float32),
`gradient_checkpointing` (recompute each vision-encoder layer in backward), `cache_size` (text features are cached
per prompt; they carry no gradient).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .convert import load_state_dict
from .paths import missing, require_hf_folder, reward_path
from .preprocess import ClipPreprocess, CropStyle, TextFeatureCache, at_least_fp32

PathLike = str | os.PathLike[str]


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


def _checkpoint_layers(layers: nn.ModuleList) -> None:
    """Makes each layer recompute its activations in backward (torch.utils.checkpoint, non-reentrant); works in eval
    mode, unlike transformers' own switch, which acts only in training mode."""
    for layer in layers:
        if getattr(layer, "_di_checkpointed", False):
            continue
        inner = layer.forward

        def fwd(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = fwd
        layer._di_checkpointed = True


class ClipTower(nn.Module):
    """A frozen CLIPModel with tensor preprocessing and a per-prompt text-feature cache."""

    def __init__(self, model: nn.Module, tokenizer: Any | None, preprocess: ClipPreprocess, *,
                 dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 cache_size: int = 4096, text_clean: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False).to(dtype)
        self.tokenizer = tokenizer
        self.text_clean = text_clean  # a reward's own text normalisation before the tokenizer (HPSv2: open_clip's)
        self.preprocess = preprocess
        self.dtype = dtype
        if gradient_checkpointing:
            _checkpoint_layers(self.model.vision_model.encoder.layers)
        self.text_cache = TextFeatureCache(self._encode_text, cache_size)

    def train(self, mode: bool = True) -> ClipTower:  # a frozen scorer: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (float32), differentiable in `images`."""
        px = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=px).pooler_output
        return F.normalize(at_least_fp32(self.model.visual_projection(pooled)), dim=-1)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) [N, context] on the model's device, as the text tower receives them."""
        if self.tokenizer is None:
            raise RuntimeError("this CLIP model was loaded without a tokenizer")
        texts = [self.text_clean(str(p)) if self.text_clean is not None else str(p) for p in prompts]
        cfg = self.model.config.text_config
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), int(cfg.max_position_embeddings))
        tok = self.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        out = self.model.text_model(input_ids=ids, attention_mask=mask)
        return F.normalize(at_least_fp32(self.model.text_projection(out.pooler_output)), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] (float32, cached per prompt, no gradient)."""
        return self.text_cache(prompts, self.device)


def _check_batch(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")


class ClipScore(nn.Module):
    """100 * cos(CLIP image, CLIP text), clamped at 0 unless clamp=False."""

    name = "clip_score"

    def __init__(self, tower: ClipTower, clamp: bool = True) -> None:
        super().__init__()
        self.tower = tower
        self.clamp = clamp

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        cos = (self.tower.image_features(images) * self.tower.text_features(prompts)).sum(dim=-1)
        score = 100.0 * cos
        return score.clamp_min(0.0) if self.clamp else score


class PickScore(nn.Module):
    """logit_scale.exp() * cos(image, text) (scale="logit", the official score) or the raw cosine (scale="cosine")."""

    name = "pickscore"

    def __init__(self, tower: ClipTower, scale: str = "logit") -> None:
        super().__init__()
        if scale not in ("logit", "cosine"):
            raise ValueError(f"scale must be 'logit' or 'cosine', got {scale!r}")
        self.tower = tower
        self.scale = scale

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        cos = (self.tower.image_features(images) * self.tower.text_features(prompts)).sum(dim=-1)
        if self.scale == "cosine":
            return cos
        return self.tower.model.logit_scale.detach().float().exp() * cos


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP; state-dict keys layers.{0,2,4,6,7}.{weight,bias} as in the .pth."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)


class AestheticScore(nn.Module):
    """LAION aesthetic predictor v2: head(normalise(CLIP image embedding)); prompts are ignored."""

    name = "aesthetic"

    def __init__(self, tower: ClipTower, head: AestheticHead) -> None:
        super().__init__()
        dim = int(tower.model.config.projection_dim)
        if head.input_size != dim:
            raise ValueError(f"aesthetic head expects {head.input_size}-d embeddings but the CLIP model gives {dim}-d "
                             f"(the v2 head runs on CLIP ViT-L/14, 768-d)")
        self.tower = tower
        self.head = head.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> AestheticScore:
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        emb = self.tower.image_features(images)
        return at_least_fp32(self.head(emb.to(self.head.layers[0].weight.dtype)))


# ---------------------------------------------------------------------------------------------------- loading
def load_clip_tower(folder: PathLike, kind: str = "clip", *, need_tokenizer: bool = True,
                    tokenizer_path: PathLike | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", gradient_checkpointing: bool = False,
                    cache_size: int = 4096, clamp_preprocess: bool = False,
                    crop_style: CropStyle = "transformers") -> ClipTower:
    """A ClipTower from a local Hugging Face CLIPModel folder (never a hub id). `crop_style`: the official
    transform's centre crop ("transformers": CLIPProcessor, for CLIP score / PickScore; "torchvision": OpenAI CLIP's
    `preprocess`, for the aesthetic predictor)."""
    folder = Path(folder)
    require_hf_folder(kind, folder, need_tokenizer=need_tokenizer and tokenizer_path is None)
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else folder
    if tokenizer_path is not None and need_tokenizer:
        if not ((tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file()):
            raise missing(kind, tok_dir / "tokenizer.json", "tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    tf = _transformers()
    model = tf.CLIPModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = tf.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True) if need_tokenizer else None
    pre_dir = tok_dir if (tok_dir / "preprocessor_config.json").is_file() else folder
    pre = ClipPreprocess.from_pretrained(pre_dir, clamp=clamp_preprocess, crop_style=crop_style)
    return ClipTower(model.to(device), tokenizer, pre, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                     cache_size=cache_size)


def load_clip_score(path: PathLike | None = None, *, models_dir: PathLike | None = None, clamp: bool = True,
                    **tower_opts: Any) -> ClipScore:
    return ClipScore(load_clip_tower(reward_path("clip", path, models_dir), "clip", **tower_opts), clamp=clamp)


def load_pickscore(path: PathLike | None = None, *, models_dir: PathLike | None = None, scale: str = "logit",
                   **tower_opts: Any) -> PickScore:
    return PickScore(load_clip_tower(reward_path("pickscore", path, models_dir), "pickscore", **tower_opts), scale)


AESTHETIC_FILES = ("sac+logos+ava1-l14-linearMSE.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


def load_aesthetic_head(path: PathLike) -> AestheticHead:
    """The MLP head from a .safetensors file, a .pth (weights_only=True), or a folder holding one of AESTHETIC_FILES."""
    p = Path(path)
    if p.is_dir():
        found = [p / f for f in AESTHETIC_FILES if (p / f).is_file()]
        if not found:
            raise missing("aesthetic", p / AESTHETIC_FILES[0], "aesthetic head")
        p = found[0]
    elif not p.is_file():
        raise missing("aesthetic", p, "aesthetic head")
    sd = load_state_dict(p)
    if "layers.0.weight" not in sd:
        raise ValueError(f"{p}: not an aesthetic-predictor head (no 'layers.0.weight'; keys: {sorted(sd)[:8]})")
    head = AestheticHead(int(sd["layers.0.weight"].shape[1]))
    head.load_state_dict(sd, strict=True)
    return head.eval().requires_grad_(False)


def load_aesthetic(path: PathLike | None = None, *, clip_path: PathLike | None = None,
                   models_dir: PathLike | None = None, **tower_opts: Any) -> AestheticScore:
    """`path`: the head file or folder (default <models>/rewards/aesthetic); `clip_path`: the CLIP ViT-L/14 folder
    (default <models>/rewards/clip)."""
    head = load_aesthetic_head(reward_path("aesthetic", path, models_dir))
    # the predictor was fit on embeddings of OpenAI CLIP's own `preprocess` (torchvision Resize + CenterCrop)
    tower_opts = {"crop_style": "torchvision", **tower_opts}
    tower = load_clip_tower(reward_path("clip", clip_path, models_dir), "clip", need_tokenizer=False, **tower_opts)
    return AestheticScore(tower, head.to(device=tower.device, dtype=tower.dtype))
