"""Where the pack's one-click path stands on every family (run by hand; the map for issue 13).

    COMFYUI_PATH=/tmp/comfy PYTHONPATH=python_shim python tests/comfy_host/family_report.py [--steps 2] [names...]

Per family (tiny and random, families.py): load through ComfyUI's loaders, one KSampler step, DI++ Align
(the node's own function, as ComfyUI calls it, under inference mode) for a few steps with the brightness
reward at the family's smallest size, One-Step Sample of the aligned MODEL, and the saved LoRA through core
LoraLoaderModelOnly, counting ComfyUI's "lora key not loaded" warnings. Prints a Markdown table, then the
conditioning each family's encoder returns and the model inputs the pack builds from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def setup(comfy_path: str, tmp: Path):
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, comfy_path)  # ahead of this folder: ComfyUI's own top-level modules (utils, nodes) win
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    import nodes as comfy_nodes

    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    for kind in ("loras", "diffusion_models"):  # away from the checkout's models/
        (tmp / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(tmp / kind), is_default=True)
    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(comfy_nodes.load_custom_node(str(ROOT))):
        raise SystemExit("ComfyUI could not load the repository as a pack")
    return comfy_nodes


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 220 else text[:217] + "..."


def report(family, comfy_nodes, tmp: Path, steps: int, counter: Any) -> dict[str, str]:
    import families
    import torch

    from diffinstruct.comfyui import host as host
    from diffinstruct.comfyui import training as comfy_train
    from diffinstruct.comfyui.files import save_weights

    row = {"family": family.name, "loads": "-", "detected": "-", "forward": "-", "align": "-", "sample": "-",
           "lora": "-", "extras": "-", "inputs": "-"}
    # the pack's V3 nodes replaced by the declarations they are built from, to call their functions directly
    mappings = {k: getattr(v, "DEFINITION", v) for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items()}
    try:
        built = families.build(family, seed=0)
        paths = families.save(family, built, tmp / "files" / family.name.replace(" ", "_"))
        loaded = families.load(family, paths)
        row["loads"] = f"yes ({family.layout})"
        verdict = loaded.verdicts[0] if loaded.verdicts else None
        row["detected"] = f"{type(loaded.model.model).__name__} / {verdict or 'no match'}"
        if not family.tiny_detected:
            row["detected"] += f" (real widths: {families.full_size_verdict(family)})"
        model, vae, clip = loaded.model, loaded.vae, families.clip_for(family)
        cond = families.conditioning(clip, "a cat")
        row["extras"] = ", ".join(k for k, v in cond[0][1].items() if v is not None) or "none"
        side = family.latent_size
        with torch.inference_mode():
            x = families.sample(model, cond, families.conditioning(clip, ""), family.latent_channels, 1, 2.0, side)
        row["forward"] = "ok" if torch.isfinite(x).all() else "NON-FINITE"
        inputs = host.encode_conditioning(model, cond[0], (side, side), 8)
        row["inputs"] = ", ".join(f"{k} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k} {v}"
                                  for k, v in inputs.items() if k != "c_crossattn")
    except Exception as exc:  # noqa: BLE001 - the table says what failed
        row["loads" if row["loads"] == "-" else "forward"] = short(exc)
        traceback.print_exc()
        return row
    size = side * 8
    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            reward = mappings["DIPPReward"]().build("brightness", 1.0, "")[0]
            started = time.perf_counter()
            out = mappings["DIPPAlign"]().align(model, clip, vae, "a cat\na dog", reward, 100.0, 1.5, steps,
                                                width=size, height=size, learning_rate=1e-2,
                                                checkpoint_dir="runs/" + family.name.replace(" ", "_"),  # in output/
                                                checkpoint_every=steps)
            out = out["result"] if isinstance(out, dict) else out  # nodes may also return what the UI shows
        info = json.loads(out[4])
        row["align"] = (f"runs ({info['process']}, {time.perf_counter() - started:.1f} s, reward "
                        f"{info['reward_first']:.4f} -> {info['reward_last']:.4f})")
    except Exception as exc:  # noqa: BLE001
        row["align"] = short(exc)
        traceback.print_exc()
        return row
    try:
        with torch.inference_mode():
            z = comfy_train.one_step_sample(out[0], cond, 0, 1, size, size)
        row["sample"] = f"ok {tuple(z.shape)}" if torch.isfinite(z).all() else "NON-FINITE"
    except Exception as exc:  # noqa: BLE001
        row["sample"] = short(exc)
    try:
        name = family.name.replace(" ", "_").replace(".", "")
        path = save_weights(out[1], tmp / "loras", f"families/{name}")
        counter.count = 0
        before = len(model.patches)
        patched = mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, f"families/{path.name}", 1.0)[0]
        layers = sum(k.endswith(".lora_down.weight") for k in out[1].tensors)
        row["lora"] = (f"{len(patched.patches) - before} of {layers} layers patched, "
                       f"{counter.count} not loaded")
    except Exception as exc:  # noqa: BLE001
        row["lora"] = short(exc)
    return row


COLUMNS = ("family", "loads", "detected", "forward", "align", "sample", "lora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("names", nargs="*")
    opts = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH", "")
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    tmp = Path(tempfile.mkdtemp(prefix="families_"))
    comfy_nodes = setup(comfy_path, tmp)
    import families

    counter = families.NotLoaded()
    logging.getLogger().addHandler(counter)

    rows = [report(f, comfy_nodes, tmp, opts.steps, counter) for f in families.FAMILIES
            if not opts.names or f.name in opts.names]
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    print("\n| family | CONDITIONING extras (encoder) | model inputs besides c_crossattn (pack) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['extras']} | {row['inputs']} |")


if __name__ == "__main__":
    main()
