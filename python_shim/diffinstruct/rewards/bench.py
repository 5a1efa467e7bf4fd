"""Cost of the reward models: forward+backward time per image at tiny size, and memory at full size.

    python -m diffinstruct.rewards.bench [--batch 4] [--size 64] [--repeats 5]

Full-size memory, per model (nothing is downloaded; the full architectures are built on the meta device):
  weights   = n_params * bytes_per_param (4 for float32, 2 for bfloat16)
  activations saved for backward to the image, per image = A_0 + L * A_layer, measured on the CPU by running a
            full-width vision tower with 1 and 2 layers and summing the bytes of the tensors autograd saves
            (weights excluded). With gradient checkpointing only the layer inputs are kept:
            about L * tokens * width * bytes, plus one layer's A_layer during its recomputation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .clip import _transformers

FULL = {  # (text config, vision config, projection_dim) of the released models
    "clip ViT-L/14 (clip score; aesthetic uses its vision tower)": (
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}, 768),
    "CLIP ViT-H/14 (pickscore, and hpsv2: the same open_clip ViT-H-14 shape)": (
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
         "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"},
        {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "hidden_act": "gelu"}, 1024),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes(fn: Any, x: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves while running fn(x) (those in `exclude` not counted)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def full_size_memory() -> dict[str, Any]:
    tf = _transformers()
    out: dict[str, Any] = {}
    for name, (text, vision, proj) in FULL.items():
        cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
        with torch.device("meta"):
            model = tf.CLIPModel(cfg)
        n_all, n_vision = _count(model), _count(model.vision_model) + _count(model.visual_projection)
        per_layer = []
        for layers in (1, 2):  # full width, 1 and 2 layers, real tensors, batch 1
            vcfg = tf.CLIPVisionConfig(**dict(vision, num_hidden_layers=layers))
            tower = tf.CLIPVisionModel(vcfg).eval().requires_grad_(False)
            exclude = {p.untyped_storage().data_ptr() for p in tower.parameters()}
            x = torch.rand(1, 3, 224, 224, requires_grad=True)
            per_layer.append(saved_bytes(lambda t, m=tower: m(pixel_values=t).pooler_output, x, exclude))
        a_layer = per_layer[1] - per_layer[0]
        a0 = per_layer[0] - a_layer
        acts = a0 + vision["num_hidden_layers"] * a_layer
        out[name] = {"params_total": n_all, "params_vision": n_vision,
                     "weights_fp32_GiB": n_all * 4 / 2**30, "weights_bf16_GiB": n_all * 2 / 2**30,
                     "activations_per_image_fp32_MiB": acts / 2**20, "activation_per_layer_MiB": a_layer / 2**20}
    head = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
    out["aesthetic head"] = {"params_total": head}
    out["imagereward (BLIP ViT-L/16 + BERT-base with cross-attention + MLP)"] = imagereward_memory(head)
    return out


def imagereward_memory(head_params: int) -> dict[str, Any]:
    """ImageReward at full size: BLIP ViT-L/16 at 224 px (197 tokens) and BERT-base (12 layers, cross-attention to the
    1024-wide image tokens, 35 text tokens). Activations as for CLIP: 1- and 2-layer towers at full width."""
    tf = _transformers()
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6}
    text = {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512, "is_decoder": True,
            "bos_token_id": None, "sep_token_id": None, "eos_token_id": None}
    with torch.device("meta"):
        n_vision = _count(tf.BlipVisionModel(tf.BlipVisionConfig(**vision)))
        n_text = _count(tf.BlipTextModel(tf.BlipTextConfig(**text), add_pooling_layer=False))
    acts = 0
    per_layer = {}
    for tower, depth in (("vision", 24), ("text", 12)):
        saved = []
        for layers in (1, 2):  # full width, 1 and 2 layers, real tensors, batch 1
            if tower == "vision":
                m = tf.BlipVisionModel(tf.BlipVisionConfig(**dict(vision, num_hidden_layers=layers)))
                x = torch.rand(1, 3, 224, 224, requires_grad=True)

                def fn(t: torch.Tensor, m: Any = m) -> torch.Tensor:
                    return m(pixel_values=t).last_hidden_state
            else:  # the gradient flows to the image through the cross-attention keys / values
                m = tf.BlipTextModel(tf.BlipTextConfig(**dict(text, num_hidden_layers=layers)), add_pooling_layer=False)
                x = torch.randn(1, 197, 1024, requires_grad=True)
                ids = torch.randint(1000, 2000, (1, 35))

                def fn(t: torch.Tensor, m: Any = m, ids: torch.Tensor = ids) -> torch.Tensor:
                    return m(input_ids=ids, encoder_hidden_states=t).last_hidden_state[:, 0]
            m.eval().requires_grad_(False)
            saved.append(saved_bytes(fn, x, {p.untyped_storage().data_ptr() for p in m.parameters()}))
        a_layer = saved[1] - saved[0]
        acts += saved[0] - a_layer + depth * a_layer
        per_layer[tower] = a_layer / 2**20
    n_all = n_vision + n_text + head_params
    return {"params_total": n_all, "params_vision": n_vision, "params_text": n_text,
            "weights_fp32_GiB": n_all * 4 / 2**30, "weights_bf16_GiB": n_all * 2 / 2**30,
            "activations_per_image_fp32_MiB": acts / 2**20, "activation_per_layer_MiB": per_layer}


def tiny_timings(batch: int = 4, size: int = 64, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per image of forward + backward (to the image) for each reward at tiny size, CPU."""
    from .registry import load_scorer
    from .tiny import write_tiny_aesthetic_head, write_tiny_clip, write_tiny_hpsv2, write_tiny_imagereward

    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_tiny_clip(root / "rewards" / "clip")
        write_tiny_clip(root / "rewards" / "pickscore", hidden_act="gelu")
        write_tiny_aesthetic_head(root / "rewards" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors")
        write_tiny_hpsv2(root / "rewards" / "hpsv2")
        write_tiny_imagereward(root / "rewards" / "imagereward")
        from .preference import PreferenceModel

        PreferenceModel().save(root / "pref.safetensors")
        prompts = [f"a red thing number {i}" for i in range(batch)]
        for name in ("brightness", "saturation", "color_match", "preference", "clip", "pickscore", "aesthetic",
                     "hpsv2", "imagereward"):
            scorer = load_scorer(name, root / "pref.safetensors" if name == "preference" else None, models_dir=root)
            x = torch.rand(batch, 3, size, size, requires_grad=True)
            scorer(x, prompts).sum().backward()  # warm-up, fills the text cache
            times = []
            for _ in range(repeats):
                x.grad = None
                t = time.perf_counter()
                scorer(x, prompts).sum().backward()
                times.append(time.perf_counter() - t)
            res[name] = 1e3 * min(times) / batch
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffinstruct.rewards.bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noisy on a shared machine)")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    report: dict[str, Any] = {"tiny_ms_per_image_fwd_bwd": tiny_timings(args.batch, args.size, args.repeats),
                              "threads": torch.get_num_threads()}
    if not args.no_memory:
        report["full_size"] = full_size_memory()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
