"""The tiny networks: a bag-of-words text encoder, an EDM-preconditioned conditional U-Net (the teacher) and
a four-headed attribute classifier (prompt fidelity).

Conditioning everywhere is token ids [B, MAX_TOKENS] from `data.tokenize`; all-padding rows are the null prompt,
which the text encoder maps to a learned null embedding (label dropout trains it, for classifier-free guidance).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import EDMDenoiser
from . import data

TEACHER_FORMAT = "diffinstruct.tiny.teacher.v1"
CLASSIFIER_FORMAT = "diffinstruct.tiny.classifier.v1"


@dataclass(frozen=True)
class TeacherConfig:
    base: int = 32
    emb: int = 128
    text: int = 64
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0


class TextEncoder(nn.Module):
    """Mean of word embeddings over the non-padding tokens -> MLP; the null prompt -> a learned vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(data.WORDS), dim, padding_idx=0)
        self.null = nn.Parameter(torch.zeros(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, {data.MAX_TOKENS}], got {tokens.dtype} {tuple(tokens.shape)}")
        mask = (tokens != 0).unsqueeze(-1).float()
        count = mask.sum(dim=1)
        pooled = (self.embed(tokens) * mask).sum(dim=1) / count.clamp_min(1.0)
        is_null = count == 0
        return torch.where(is_null, self.null.expand_as(pooled), self.mlp(pooled))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a FiLM (scale, shift) from the embedding in between."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _coords(x: torch.Tensor) -> torch.Tensor:
    """Two channels of pixel coordinates in [-1, 1]: the network must know where "top left" is."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([ys, xs], dim=1)


class TinyUNet(nn.Module):
    """F(c_in x, c_noise, tokens) for EDMDenoiser: 16x16 -> 8x8 -> 4x4 and back, with skip connections."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        c, e = cfg.base, cfg.emb
        self.text = TextEncoder(cfg.text)
        self.noise_freqs = 16
        self.noise_mlp = nn.Sequential(nn.Linear(2 * self.noise_freqs, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_proj = nn.Linear(cfg.text, e)
        self.inp = nn.Conv2d(5, c, 3, padding=1)
        self.enc1 = ResBlock(c, c, e)
        self.down1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.enc2 = ResBlock(2 * c, 2 * c, e)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * c, 2 * c, e)
        self.mid2 = ResBlock(2 * c, 2 * c, e)
        self.up2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.dec2 = ResBlock(4 * c, 2 * c, e)
        self.up1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.dec1 = ResBlock(2 * c, c, e)
        self.out_norm = nn.GroupNorm(8, c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def embedding(self, c_noise: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.noise_freqs, dtype=torch.float32, device=c_noise.device)
        angles = c_noise.float().reshape(-1, 1) * (2.0 ** (k / 2.0)).reshape(1, -1) * math.pi
        feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        return F.silu(self.noise_mlp(feats) + self.cond_proj(self.text(tokens)))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(c_noise, tokens)
        h1 = self.enc1(self.inp(torch.cat([x, _coords(x)], dim=1)), emb)
        h2 = self.enc2(self.down1(h1), emb)
        h = self.mid2(self.mid1(self.down2(h2), emb), emb)
        h = self.up2(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.dec2(torch.cat([h, h2], dim=1), emb)
        h = self.up1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.dec1(torch.cat([h, h1], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def build_teacher(cfg: TeacherConfig | None = None) -> EDMDenoiser:
    """A freshly initialised teacher denoiser D(x, sigma, tokens) -> x0 (seed torch before calling)."""
    cfg = cfg or TeacherConfig()
    return EDMDenoiser(TinyUNet(cfg), sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)


class AttributeClassifier(nn.Module):
    """images [B, 3, 16, 16] in [0, 1] -> logits per attribute (colour 4, shape 3, size 2, position 4)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(5, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * w * 16, 64), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(64, len(v)) for k, v in data.ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """64 features per image: the space distances between sample sets are measured in."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, data.SIZE, data.SIZE):
            raise ValueError(f"expected images [B, 3, {data.SIZE}, {data.SIZE}], got {tuple(images.shape)}")
        x = images.float() * 2.0 - 1.0
        return self.body(torch.cat([x, _coords(x)], dim=1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------------- weights
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_FILE = "teacher.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
MANIFEST_FILE = "manifest.json"
META_KEY = "diffinstruct"


def _weights_path(name: str, folder: str | Path | None) -> Path:
    path = Path(folder if folder is not None else WEIGHTS_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(f"tiny weights not found: {path}; they ship with the package in {WEIGHTS_DIR} and "
                                f"are rebuilt by `python -m diffinstruct.tiny.build_weights --out {path.parent}`")
    return path


def _read(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    return load_file(str(path)), dict(meta.get("config", {}))


def save_module(module: nn.Module, path: str | Path, fmt: str, config: dict[str, Any]) -> Path:
    """safetensors with sorted keys and fixed metadata, written atomically (same weights -> same bytes)."""

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(module.state_dict().items())}
    from ..atomic import replacing

    with replacing(path) as tmp:
        # one metadata key: safetensors writes several in an unspecified order, which would change the bytes
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps({"format": fmt, "config": config},
                                                                    sort_keys=True)})
    return path


def load_teacher(folder: str | Path | None = None) -> EDMDenoiser:
    """The shipped tiny teacher (frozen, eval mode): D(x [B, 3, 16, 16] in [-1, 1], sigma, tokens) -> x0."""
    path = _weights_path(TEACHER_FILE, folder)
    tensors, config = _read(path, TEACHER_FORMAT)
    teacher = build_teacher(TeacherConfig(**config))
    teacher.load_state_dict(tensors, strict=True)
    return teacher.eval().requires_grad_(False)


def teacher_config_dict(cfg: TeacherConfig) -> dict[str, Any]:
    return asdict(cfg)


def load_classifier(folder: str | Path | None = None) -> AttributeClassifier:
    """The shipped attribute classifier (frozen, eval mode)."""
    path = _weights_path(CLASSIFIER_FILE, folder)
    tensors, config = _read(path, CLASSIFIER_FORMAT)
    model = AttributeClassifier(width=int(config.get("width", 32)))
    model.load_state_dict(tensors, strict=True)
    return model.eval().requires_grad_(False)
