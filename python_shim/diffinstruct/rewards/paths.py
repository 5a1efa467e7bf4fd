"""Where reward weights live on disk, and the errors raised when they are missing. Nothing here downloads.

Layout under a models folder (ComfyUI's `ComfyUI/models`, or any folder given by `models_dir=` or the
environment variable DIFFINSTRUCT_MODELS_DIR)::

    <models>/rewards/clip/         Hugging Face CLIPModel folder, default openai/clip-vit-large-patch14
                                   (config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt,
                                   preprocessor_config.json)
    <models>/rewards/pickscore/    Hugging Face CLIPModel folder of yuvalkirstain/PickScore_v1 plus the tokenizer and
                                   preprocessor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    <models>/rewards/aesthetic/    sac+logos+ava1-l14-linearMSE.safetensors (the LAION improved aesthetic predictor v2
                                   head; convert the .pth with `python -m diffinstruct.rewards.convert`); the CLIP
                                   ViT-L/14 it runs on is <models>/rewards/clip/ unless `clip_path=` is given
    <models>/rewards/hpsv2/        HPS_v2.1_compressed.pt or HPS_v2_compressed.pt (or the .safetensors conversion) +
                                   CLIP tokenizer files (vocab.json + merges.txt), else those of <models>/rewards/clip/
    <models>/rewards/imagereward/  ImageReward.pt (or ImageReward.safetensors) + tokenizer/ (bert-base-uncased:
                                   vocab.txt, tokenizer_config.json)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import RewardWeightsNotFound

ENV_MODELS_DIR = "DIFFINSTRUCT_MODELS_DIR"

SUBDIRS = {
    "clip": "rewards/clip",
    "pickscore": "rewards/pickscore",
    "aesthetic": "rewards/aesthetic",
    "hpsv2": "rewards/hpsv2",
    "imagereward": "rewards/imagereward",
}

SOURCES = {
    "clip": "the Hugging Face repo openai/clip-vit-large-patch14 (config.json, model.safetensors, tokenizer.json, "
            "vocab.json, merges.txt, preprocessor_config.json)",
    "pickscore": "the Hugging Face repo yuvalkirstain/PickScore_v1 (config.json, model.safetensors) plus "
                 "tokenizer.json, vocab.json, merges.txt, preprocessor_config.json from "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor, "
                 "converted with `python -m diffinstruct.rewards.convert sac+logos+ava1-l14-linearMSE.pth "
                 "sac+logos+ava1-l14-linearMSE.safetensors` (a .pth also loads, with torch.load(weights_only=True))",
    "hpsv2": "HPS_v2.1_compressed.pt or HPS_v2_compressed.pt from the Hugging Face repo xswu/HPSv2 (loaded with "
             "torch.load(weights_only=True); or converted with `python -m diffinstruct.rewards.convert "
             "HPS_v2.1_compressed.pt HPS_v2.1_compressed.safetensors`) plus the CLIP tokenizer files vocab.json + "
             "merges.txt (or tokenizer.json) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (or those in "
             "<models>/rewards/clip/)",
    "imagereward": "ImageReward.pt from the Hugging Face repo THUDM/ImageReward (loaded with "
                   "torch.load(weights_only=True); or converted with `python -m diffinstruct.rewards.convert "
                   "ImageReward.pt ImageReward.safetensors`) plus the bert-base-uncased tokenizer files (vocab.txt, "
                   "tokenizer_config.json) in a subfolder tokenizer/",
}


def models_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The models folder: `explicit`, else $DIFFINSTRUCT_MODELS_DIR, else ComfyUI's folder_paths.models_dir when
    running inside ComfyUI (only if `folder_paths` is already imported), else None."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env)
    fp = sys.modules.get("folder_paths")
    if fp is not None and getattr(fp, "models_dir", None):
        return Path(fp.models_dir)
    return None


def reward_path(kind: str, path: str | os.PathLike[str] | None = None,
                models: str | os.PathLike[str] | None = None) -> Path:
    """The folder or file for reward `kind`: `path` if given, else <models>/rewards/<kind>."""
    if path is not None:
        return Path(path)
    base = models_dir(models)
    if base is None:
        raise RewardWeightsNotFound(
            f"no location for the '{kind}' reward weights: pass path=..., or models_dir=..., or set "
            f"{ENV_MODELS_DIR}=/path/to/ComfyUI/models; the files then go in <models>/{SUBDIRS.get(kind, kind)}/ "
            f"({SOURCES.get(kind, 'see docs/REWARDS.md')}). Nothing is downloaded.")
    return base / SUBDIRS.get(kind, f"rewards/{kind}")


def missing(kind: str, path: Path, what: str) -> RewardWeightsNotFound:
    return RewardWeightsNotFound(
        f"{kind} reward: {what} not found at {path}. Put {SOURCES.get(kind, 'the files (see docs/REWARDS.md)')} "
        f"there (default place: <models>/{SUBDIRS.get(kind, kind)}/ with <models> = ComfyUI/models or "
        f"${ENV_MODELS_DIR}), or pass the path explicitly. Nothing is downloaded.")


def require_hf_folder(kind: str, folder: Path, need_tokenizer: bool = True) -> None:
    """Checks that `folder` holds a Hugging Face model (config + weights [+ tokenizer])."""
    if not folder.is_dir():
        raise missing(kind, folder, "model folder")
    if not (folder / "config.json").is_file():
        raise missing(kind, folder / "config.json", "config.json")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / w).is_file() for w in weights):
        raise missing(kind, folder / "model.safetensors", "weights (model.safetensors)")
    if need_tokenizer and not ((folder / "tokenizer.json").is_file()
                               or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise missing(kind, folder / "tokenizer.json", "tokenizer (tokenizer.json, or vocab.json + merges.txt)")
