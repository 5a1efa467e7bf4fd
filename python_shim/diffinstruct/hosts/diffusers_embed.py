"""Write the "diffusers" problem's prompt-embeddings file from a local pipeline's text encoder(s).

    diffinstruct embed --model PIPELINE_DIR --prompts coco1k|hpsv2|hpsv2:STYLE|FILE [--prompts ...]
        --out FILE.safetensors [--kind auto|unet|pixart|sd3] [--dtype float32|bfloat16]
        [--batch N] [--size PIXELS] [--device cpu|cuda] [--no-progress]
    (`python -m diffinstruct.hosts.diffusers_embed ...` is the same command)

The conditioning is what diffusers' own pipelines compute (without clip-skip), so a run trained or evaluated on
the file sees the prompts as the pipeline would:
  * SD1.5-style (unet/ + tokenizer/ + text_encoder/): CLIPTokenizer padded to model_max_length (77),
    encoder_hidden_states = CLIPTextModel(ids).last_hidden_state (StableDiffusionPipeline.encode_prompt).
  * SDXL (also tokenizer_2/ + text_encoder_2/): the penultimate hidden states of both encoders concatenated,
    added_cond_kwargs = {text_embeds: the pooled, projected output of text_encoder_2, time_ids: (size, size,
    0, 0, size, size)} (StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids). The null prompt "" is all
    zeros when model_index.json's force_zeros_for_empty_prompt is true (the SDXL default), as the pipeline does
    for CFG's unconditional branch without a negative prompt.
PixArt (T5) and SD3 (CLIP-L + CLIP-G + T5) are refused with an error that says how to write the file from Python
(diffinstruct.hosts.diffusers.save_prompt_embeddings).

The file always holds the null prompt "" (CFG's unconditional branch); prompts are deduplicated; it is written
atomically. Only local files are read (local_files_only): a missing folder or file is an error naming it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import replacing
from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUPPORTED = "SD1.5-style (unet/ + text_encoder/) and SDXL (unet/ + text_encoder/ + text_encoder_2/) pipelines"
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


# ============================================================================================== prompts
def gather_prompts(specs: Sequence[str]) -> list[str]:
    """"" first, then the prompts of every --prompts (a named set or a file), deduplicated in order."""
    from ..prompt_sets import PROMPT_SETS, load_prompts

    out: dict[str, None] = {"": None}
    for spec in specs:
        key = spec.strip().lower()
        path = Path(spec).expanduser()
        named = key in PROMPT_SETS or key.startswith("hpsv2:")
        if not named and not path.exists():
            raise ConfigError(f"--prompts {spec!r} is neither a prompt set ({', '.join(PROMPT_SETS)}, hpsv2:STYLE) "
                              f"nor an existing prompt file ({path} does not exist)")
        for item in load_prompts(spec):
            out.setdefault(item.prompt, None)
    return list(out)


# ============================================================================================== local files
def _require_dir(pipeline: Path, sub: str, files: Sequence[Sequence[str]], what: str) -> Path:
    folder = pipeline / sub
    if not folder.is_dir():
        raise ConfigError(f"pipeline folder {pipeline} has no {sub}/ ({what}); expected {folder} "
                          "(only local files are read; nothing is downloaded)")
    if not any(all((folder / f).is_file() for f in group) for group in files):
        want = " or ".join(" + ".join(str(folder / f) for f in group) for group in files)
        raise ConfigError(f"{what} folder {folder} is incomplete: expected {want}")
    return folder


def _encoder_files() -> list[list[str]]:
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return [["config.json", w] for w in weights]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def detect_pipeline(pipeline: Path, kind: str = "auto") -> str:
    """"sd15" or "sdxl" for a pipeline folder; ConfigError for a missing folder or an unsupported kind."""
    from . import diffusers as H

    if not pipeline.is_dir():
        raise ConfigError(f"--model {pipeline}: expected a local diffusers pipeline folder (model_index.json, unet/, "
                          "tokenizer/, text_encoder/), and it does not exist or is not a folder")
    if kind == "auto":
        try:
            kind = H.detect_kind(pipeline)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--model {pipeline}: {exc} (or pass --kind)") from None
    if kind in ("pixart", "sd3"):
        encoders = "a T5 encoder" if kind == "pixart" else "CLIP-L + CLIP-G + T5 encoders"
        raise ConfigError(f"--model {pipeline}: {kind} pipelines ({encoders}) are not supported by this command; "
                          f"supported: {SUPPORTED}. Write the file from Python instead: "
                          "diffinstruct.hosts.diffusers.save_prompt_embeddings(path, {prompt: cond dict}), with the "
                          "null prompt \"\" and the cond keys listed in diffinstruct/hosts/diffusers.py")
    if kind != "unet":
        raise ConfigError(f"--kind {kind!r} is not valid; choose one of auto, unet, pixart, sd3")
    return "sdxl" if (pipeline / "text_encoder_2").exists() or (pipeline / "tokenizer_2").exists() else "sd15"


def _load_pair(pipeline: Path, suffix: str, cls: str, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    import transformers as tf

    tok_dir = _require_dir(pipeline, f"tokenizer{suffix}", TOKENIZER_FILES, "tokenizer")
    enc_dir = _require_dir(pipeline, f"text_encoder{suffix}", _encoder_files(), "text encoder")
    try:
        tokenizer = tf.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        encoder = getattr(tf, cls).from_pretrained(str(enc_dir), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the {cls} from {enc_dir} with its tokenizer {tok_dir}: {exc}") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def _ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    # exactly the pipelines' tokenisation: pad to model_max_length, truncate longer prompts
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ============================================================================================== encoders
class SD15Encoder:
    """StableDiffusionPipeline.encode_prompt without clip-skip: {"encoder_hidden_states": last_hidden_state}."""

    def __init__(self, pipeline: Path, dtype: torch.dtype, device: str) -> None:
        self.tokenizer, self.encoder = _load_pair(pipeline, "", "CLIPTextModel", dtype, device)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[dict[str, Any]]:
        ids = _ids(self.tokenizer, prompts)
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):  # as the pipeline: only if the config says so
            mask = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").attention_mask.to(self.device)
        hidden = self.encoder(ids.to(self.device), attention_mask=mask)[0]
        return [{"encoder_hidden_states": hidden[i : i + 1].cpu()} for i in range(len(prompts))]


class SDXLEncoder:
    """StableDiffusionXLPipeline.encode_prompt without clip-skip, plus its add_time_ids for a square `size`."""

    def __init__(self, pipeline: Path, dtype: torch.dtype, device: str, size: int | None) -> None:
        self.tok1, self.enc1 = _load_pair(pipeline, "", "CLIPTextModel", dtype, device)
        self.tok2, self.enc2 = _load_pair(pipeline, "_2", "CLIPTextModelWithProjection", dtype, device)
        self.device = device
        unet = _read_json(pipeline / "unet" / "config.json") if (pipeline / "unet" / "config.json").is_file() else {}
        if size is None:
            size = int(unet.get("sample_size", 128)) * 8  # the pipeline's default resolution: sample_size * 8
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype)
        # the pipeline's own consistency check (_get_add_time_ids), made before any encoding
        need = unet.get("projection_class_embeddings_input_dim")
        have = int(unet.get("addition_time_embed_dim") or 0) * 6 + int(self.enc2.config.projection_dim)
        if need is not None and int(need) != have:
            raise ConfigError(f"{pipeline}: the UNet expects an added embedding of {need} values, but the text "
                              f"encoders give {have} (6 x addition_time_embed_dim + text_encoder_2 projection_dim); "
                              "this is not an SDXL base pipeline (refiners are not supported)")
        index = pipeline / "model_index.json"
        self.zero_null = bool(_read_json(index).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[dict[str, Any]]:
        out1 = self.enc1(_ids(self.tok1, prompts).to(self.device), output_hidden_states=True)
        out2 = self.enc2(_ids(self.tok2, prompts).to(self.device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).cpu()
        pooled = out2.text_embeds.cpu()
        conds = []
        for i, prompt in enumerate(prompts):
            h, p = hidden[i : i + 1], pooled[i : i + 1]
            if prompt == "" and self.zero_null:
                h, p = torch.zeros_like(h), torch.zeros_like(p)
            conds.append({"encoder_hidden_states": h,
                          "added_cond_kwargs": {"text_embeds": p, "time_ids": self.time_ids.clone()}})
        return conds


# ============================================================================================== writing
def write_embeddings(out: Path, table: dict[str, dict[str, Any]]) -> None:
    """save_prompt_embeddings to a temporary sibling, fsync, rename: a crash never leaves a half-written file."""
    from . import diffusers as H

    with replacing(out) as tmp:
        H.save_prompt_embeddings(tmp, table)


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def embed(pipeline: Path, prompts: list[str], *, kind: str = "auto", dtype: torch.dtype = torch.float32,
          batch: int = 16, size: int | None = None, device: str = "cpu",
          progress: bool = True) -> dict[str, dict[str, Any]]:
    """{prompt: cond dict (batch 1)} for `prompts` from the pipeline's text encoder(s)."""
    from tqdm import tqdm

    layout = detect_pipeline(pipeline, kind)
    encoder: SD15Encoder | SDXLEncoder = (SDXLEncoder(pipeline, dtype, device, size) if layout == "sdxl"
                                          else SD15Encoder(pipeline, dtype, device))
    table: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(prompts), desc=f"embedding ({layout})", unit="prompt", disable=not progress) as bar:
        for part in _batches(prompts, batch):
            table.update(zip(part, encoder(part), strict=True))
            bar.update(len(part))
    return table


# ============================================================================================== command line
def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    prompts = gather_prompts(args.prompts)
    table = embed(Path(args.model).expanduser(), prompts, kind=args.kind, dtype=DTYPES[args.dtype],
                  batch=args.batch, size=args.size, device=args.device, progress=not args.no_progress)
    write_embeddings(out, table)
    return {"out": str(out), "prompts": len(table), "keys": sorted(_keys(table[""]))}


def _keys(cond: dict[str, Any], prefix: str = "") -> list[str]:
    return [k for key, v in cond.items()
            for k in (_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def command(args: argparse.Namespace) -> int:
    """`diffinstruct embed ...` (arguments parsed by cli.py); prints what was written, as JSON."""
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":  # `python -m diffinstruct.hosts.diffusers_embed ...` is `diffinstruct embed ...`
    from diffinstruct.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
