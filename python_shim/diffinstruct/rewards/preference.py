"""The reward-modelling stage: a small preference model trained from pairwise preferences (Bradley-Terry).

    P(a preferred over b) = sigmoid(s(a) - s(b)),   s(x) = MLP(standardise(features(x)))

`features` is a frozen, weight-free, differentiable image descriptor (`ImageStatsFeatures`: an 8x8 average-pooled
thumbnail, per-channel mean / std, brightness, saturation); the score is prompt-agnostic. The trained model is an
`ImageScorer` (images [B, 3, H, W] in [0, 1] -> [B], differentiable), saved as safetensors (weights + metadata)
plus a JSON sidecar with the architecture and the training record.

Pairs, one of:
  * a JSONL file, one object per line: {"prompt": str (optional), "image_a": path, "image_b": path, "label": x}
    with label 1 = a preferred, 0 = b preferred, 0.5 = tie (or "preferred": "a" / "b"); relative paths are taken
    from the JSONL file's folder;
  * a folder with pairs.jsonl in it, or with chosen/ and rejected/ subfolders holding files of the same names
    (label 1 for chosen = image_a);
  * a .safetensors file with tensors image_a [N, 3, H, W], image_b [N, 3, H, W] in [0, 1] and label [N].

CLI (`python -m diffinstruct.rewards.preference ...` is the same command):
    diffinstruct preference train --pairs FILE --out model.safetensors [--epochs 200 ...]
    diffinstruct preference eval --model model.safetensors --pairs FILE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .builtin import BrightnessReward, SaturationReward
from .preprocess import at_least_fp32, check_images

PathLike = str | os.PathLike[str]
FORMAT = "diffinstruct.preference.v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageStatsFeatures(nn.Module):
    """Weight-free differentiable features: 8x8 thumbnail (192), channel mean, std, brightness, saturation."""

    grid = 8
    dim = 3 * grid * grid + 3 + 3 + 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        x = at_least_fp32(images)
        thumb = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        mean = x.mean(dim=(2, 3))
        std = (x.var(dim=(2, 3), unbiased=False) + 1e-8).sqrt()
        bright = BrightnessReward()(x).unsqueeze(1)
        sat = SaturationReward()(x).unsqueeze(1)
        return torch.cat([thumb, mean, std, bright, sat], dim=1)


class PreferenceModel(nn.Module):
    """s(images) = MLP(standardise(features(images))); a differentiable ImageScorer."""

    name = "preference"

    def __init__(self, hidden: int = 64, features: str = "image_stats") -> None:
        super().__init__()
        if features != "image_stats":
            raise ValueError(f"unknown feature extractor {features!r} (available: image_stats)")
        self.features_kind = features
        self.features = ImageStatsFeatures()
        self.hidden = int(hidden)
        dim = self.features.dim
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, 1))

    def set_standardisation(self, feats: torch.Tensor) -> None:
        self.feat_mean.copy_(feats.mean(dim=0))
        self.feat_std.copy_(feats.std(dim=0).clamp_min(1e-4))

    def score_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp((feats - self.feat_mean) / self.feat_std).squeeze(-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.score_features(self.features(images))

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": self.features_kind, "hidden": self.hidden,
                "feature_dim": self.features.dim}

    def save(self, path: PathLike, record: dict[str, Any] | None = None) -> Path:
        """Writes `path` (.safetensors: tensors + metadata) and `path` with suffix .json (config + training record),
        each atomically, so an interrupted save never leaves a truncated model behind."""
        from safetensors.torch import save

        from ..atomic import write_bytes_atomic, write_text_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": json.dumps(self.config()), "record": json.dumps(record or {})}
        write_bytes_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                                      metadata=meta))
        write_text_atomic(path.with_suffix(".json"),
                          json.dumps({"config": self.config(), "record": record or {}}, indent=2))
        return path

    @classmethod
    def load(cls, path: PathLike) -> PreferenceModel:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"preference model not found: {path} (train one with "
                                    f"`python -m diffinstruct.rewards.preference train --pairs FILE --out {path}`)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path}: no 'config' metadata; not a diffinstruct preference model")
        cfg = json.loads(meta["config"])
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
        model = cls(hidden=int(cfg["hidden"]), features=str(cfg["features"]))
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Pairs:
    image_a: torch.Tensor  # [N, 3, H, W] in [0, 1]
    image_b: torch.Tensor
    label: torch.Tensor    # [N], 1 = a preferred, 0 = b preferred, 0.5 = tie
    prompts: list[str]

    def __len__(self) -> int:
        return int(self.label.shape[0])


def _load_image(path: Path) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is present wherever images are read
        raise ImportError("reading image files needs Pillow (pip install pillow)") from exc
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def _label(row: dict[str, Any], where: str) -> float:
    if "label" in row:
        lab = float(row["label"])
    elif "preferred" in row:
        pref = str(row["preferred"]).lower()
        if pref not in ("a", "b", "tie"):
            raise ValueError(f"{where}: preferred must be 'a', 'b' or 'tie', got {pref!r}")
        lab = {"a": 1.0, "b": 0.0, "tie": 0.5}[pref]
    else:
        raise ValueError(f"{where}: needs 'label' (1 = a preferred, 0 = b, 0.5 = tie) or 'preferred'")
    if not 0.0 <= lab <= 1.0:
        raise ValueError(f"{where}: label must be in [0, 1], got {lab}")
    return lab


def _stack(images: list[torch.Tensor], size: int | None) -> torch.Tensor:
    if size is not None:
        images = [F.interpolate(im[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
                  .clamp(0, 1) for im in images]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:4]}; pass --size to resize them")
    return torch.stack(images)


def load_pairs(source: PathLike, size: int | None = 64) -> Pairs:
    """Pairs from a JSONL file, a folder (pairs.jsonl, or chosen/ + rejected/) or a .safetensors tensors file."""
    src = Path(source)
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        t = load_file(str(src))
        for k in ("image_a", "image_b", "label"):
            if k not in t:
                raise ValueError(f"{src}: missing tensor {k!r} (needs image_a, image_b, label)")
        n = int(t["label"].shape[0])
        return Pairs(t["image_a"].float(), t["image_b"].float(), t["label"].float(), [""] * n)
    rows: list[tuple[Path, Path, float, str]] = []
    if src.is_dir() and (src / "chosen").is_dir() and (src / "rejected").is_dir():
        for f in sorted((src / "chosen").iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                other = src / "rejected" / f.name
                if not other.is_file():
                    raise FileNotFoundError(f"{f} has no partner {other}")
                rows.append((f, other, 1.0, ""))
    else:
        jsonl = src / "pairs.jsonl" if src.is_dir() else src
        if not jsonl.is_file():
            raise FileNotFoundError(f"pairs not found: {jsonl} (a JSONL file, a folder with pairs.jsonl or chosen/ + "
                                    f"rejected/, or a .safetensors file)")
        base = jsonl.parent
        for i, line in enumerate(jsonl.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{jsonl}:{i + 1}"
            if "image_a" not in row or "image_b" not in row:
                raise ValueError(f"{where}: needs image_a and image_b")
            rows.append((base / row["image_a"], base / row["image_b"], _label(row, where), str(row.get("prompt", ""))))
    if not rows:
        raise ValueError(f"no pairs in {src}")
    a = _stack([_load_image(r[0]) for r in rows], size)
    b = _stack([_load_image(r[1]) for r in rows], size)
    return Pairs(a, b, torch.tensor([r[2] for r in rows]), [r[3] for r in rows])


# ---------------------------------------------------------------------------------------------------- training
def bt_loss(s_a: torch.Tensor, s_b: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood: BCE(sigmoid(s_a - s_b), label)."""
    return F.binary_cross_entropy_with_logits(s_a - s_b, label)


@torch.no_grad()
def accuracy(model: PreferenceModel, pairs: Pairs) -> float:
    """Fraction of non-tied pairs whose preferred image scores higher."""
    s_a, s_b = model(pairs.image_a), model(pairs.image_b)
    decided = pairs.label != 0.5
    if not bool(decided.any()):
        return math.nan
    right = ((s_a > s_b) == (pairs.label > 0.5))[decided]
    return float(right.float().mean())


def train(pairs: Pairs, *, hidden: int = 64, epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-2,
          batch_size: int = 256, val_fraction: float = 0.1, seed: int = 0) -> tuple[PreferenceModel, dict[str, Any]]:
    """Fits the Bradley-Terry model with AdamW; keeps the epoch with the lowest validation loss (early stopping) when
    there is a validation split. Returns the model and a training record (losses, accuracies)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(pairs)
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(n * val_fraction)) if n >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    model = PreferenceModel(hidden=hidden)
    with torch.no_grad():
        fa, fb = model.features(pairs.image_a), model.features(pairs.image_b)
    model.set_standardisation(torch.cat([fa[tr_idx], fb[tr_idx]]))
    opt = torch.optim.AdamW(model.mlp.parameters(), lr=lr, weight_decay=weight_decay)
    label = pairs.label.float()
    losses: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = bt_loss(model.score_features(fa[idx]), model.score_features(fb[idx]), label[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(len(tr_idx), 1))
        if n_val:
            with torch.no_grad():
                val_loss = float(bt_loss(model.score_features(fa[val_idx]), model.score_features(fb[val_idx]),
                                         label[val_idx]))
            if best is None or val_loss < best[0]:
                best = (val_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[2])
    model.eval().requires_grad_(False)

    def acc(idx: torch.Tensor) -> float:
        if len(idx) == 0:
            return math.nan
        sub = Pairs(pairs.image_a[idx], pairs.image_b[idx], label[idx], [pairs.prompts[i] for i in idx.tolist()])
        return accuracy(model, sub)

    record = {"pairs": n, "train_pairs": int(len(tr_idx)), "val_pairs": int(n_val), "epochs": epochs, "lr": lr,
              "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "final_train_loss": losses[-1],
              "best_epoch": best[1] if best is not None else epochs - 1,
              "best_val_loss": best[0] if best is not None else math.nan,
              "train_accuracy": acc(tr_idx), "val_accuracy": acc(val_idx)}
    return model, record


def command(args: argparse.Namespace) -> int:
    """`diffinstruct preference train | eval` (arguments parsed by cli.py). A missing or malformed pairs or model
    file raises FileNotFoundError / ValueError: bad input, exit status 2."""
    pairs = load_pairs(args.pairs, size=args.size or None)
    if args.cmd == "train":
        if not str(args.out).endswith(".safetensors"):
            raise ValueError("--out must end in .safetensors")
        model, record = train(pairs, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                              weight_decay=args.weight_decay, batch_size=args.batch_size,
                              val_fraction=args.val_fraction, seed=args.seed)
        record["source"] = str(args.pairs)
        model.save(args.out, record)
        print(json.dumps({"out": str(args.out), **record}))
    else:
        model = PreferenceModel.load(args.model)
        print(json.dumps({"model": str(args.model), "pairs": len(pairs), "accuracy": accuracy(model, pairs)}))
    return 0


if __name__ == "__main__":  # `python -m diffinstruct.rewards.preference ...` is `diffinstruct preference ...`
    from diffinstruct.cli import main

    raise SystemExit(main(["preference", *sys.argv[1:]]))
