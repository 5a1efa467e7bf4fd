"""Graph -> cluster: a composed run exported from the graph, trained by the command line under torchrun.

The run config is the part of the queued workflow the run needs, in ComfyUI's own API format: the nodes upstream
of DI++ Export Run's MODEL, loss, VAE and CLIP inputs (loaders, text encoders, Reference Score, TA Model, rewards,
Generator Loss), plus the export node's training settings. On the cluster every rank imports ComfyUI, executes
those nodes with ComfyUI's own classes (so a checkpoint loads exactly as it did in the graph, from that machine's
model folders), and trains with the same glue as the Train node (training.train). Under torchrun the engine runs
data-parallel (distributed.py: each rank draws its own batches, gradients are averaged, rank 0 writes the
checkpoints), so the effective batch is world_size x batch_size. Rank 0 then saves the weights with Save's writer
in Save's format: a LoRA loads back through core Load LoRA, full weights through Load Diffusion Model.

    python -m torch.distributed.run --nproc_per_node 8 -m diffinstruct comfyui train --config RUN.json \\
        --comfyui /path/to/ComfyUI --out /path/to/ComfyUI/models/loras/cluster

Re-running the same command resumes from the newest checkpoint in --out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMAT = "diffinstruct.comfyui-run/1"
LINKS = ("model", "loss", "vae", "clip")  # what the export node takes from the graph
TRAIN_KEYS = ("prompts", "steps", "batch_size", "learning_rate", "seed", "width", "height", "checkpoint_every",
              "ema_decay", "gradient_checkpointing", "bf16", "filename_prefix")
# nodes that train when executed: a graph that needs one would train it again on every rank
NOT_EXPORTABLE = frozenset({"DIPPTrain", "DIPPAlign", "DIPPExportRun"})


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def upstream(prompt: Mapping[str, Any], roots: list[str]) -> dict[str, dict[str, Any]]:
    """The nodes `roots` depend on (themselves included), each as {"class_type", "inputs"}."""
    seen: dict[str, dict[str, Any]] = {}
    pending = list(roots)
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        if key not in prompt:
            raise ConfigError(f"the workflow links to node {key}, which it does not hold")
        entry = prompt[key]
        seen[key] = {"class_type": entry["class_type"], "inputs": dict(entry["inputs"])}
        pending += [v[0] for v in entry["inputs"].values() if _is_link(v)]
    return dict(sorted(seen.items(), key=lambda kv: (len(kv[0]), kv[0])))


def export_config(prompt: Mapping[str, Any] | None, node_id: str | None, train: Mapping[str, Any]) -> dict[str, Any]:
    """The run config of export node `node_id` of the queued API-format `prompt`."""
    if not isinstance(prompt, Mapping) or node_id is None or str(node_id) not in prompt:
        raise ConfigError("DI++ Export Run exports the queued workflow: run it from ComfyUI (queue the prompt)")
    inputs = prompt[str(node_id)]["inputs"]
    links = {name: inputs[name] for name in LINKS if _is_link(inputs.get(name))}
    graph = upstream(prompt, [v[0] for v in links.values()])
    trains = sorted({v["class_type"] for v in graph.values()} & NOT_EXPORTABLE)
    if trains:
        raise ConfigError(f"the exported run would depend on {', '.join(trains)}, which trains when it runs; "
                          "export a run whose MODEL comes from a loader (save an earlier result and load it)")
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}; known: {', '.join(TRAIN_KEYS)}")
    return {"format": FORMAT, "graph": graph, "inputs": links, "train": dict(train)}


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    from ..checkpoint import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(config, indent=1, sort_keys=True) + "\n")
    return path


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--config {p}: no such file (DI++ Export Run writes one)")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {p} is not JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"--config {p} is not a run exported by DI++ Export Run (format {FORMAT})")
    missing = [k for k in ("graph", "inputs", "train") if not isinstance(config.get(k), dict)]
    if missing or "loss" not in config["inputs"] or "model" not in config["inputs"]:
        raise ConfigError(f"--config {p} lacks {', '.join(missing) or 'its loss or model link'}")
    return config


def _call(cls: type, inputs: dict[str, Any]) -> tuple[Any, ...]:
    """One node's outputs, called as ComfyUI's executor calls it (execution.py): a V3 node through a class clone
    (PREPARE_CLASS_CLONE, no hidden inputs: an exported graph has none) and its FUNCTION, a V1 node through an
    instance; a coroutine is run to completion."""
    import asyncio
    import inspect

    cls = getattr(cls, "DEFINITION", cls)  # the pack's V3 nodes: the declaration they are built from
    if hasattr(cls, "PREPARE_CLASS_CLONE"):
        out = getattr(cls.PREPARE_CLASS_CLONE({}), cls.FUNCTION)(**inputs)
    else:
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    if hasattr(out, "args") and hasattr(out, "ui"):  # V3 NodeOutput
        return tuple(out.args)
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def execute(graph: Mapping[str, Any], classes: Mapping[str, type]) -> dict[str, tuple[Any, ...]]:
    """Every node of `graph`, each after the nodes it links to, with `classes` (ComfyUI's NODE_CLASS_MAPPINGS)."""
    absent = sorted({v["class_type"] for v in graph.values()} - set(classes))
    if absent:
        raise ConfigError(f"this ComfyUI has no node {', '.join(absent)}: install the node packs the workflow used "
                          "(or name their folders with --custom-node)")
    results: dict[str, tuple[Any, ...]] = {}
    pending = dict(graph)
    while pending:
        ready = [k for k, v in pending.items() if all(x[0] in results for x in v["inputs"].values() if _is_link(x))]
        if not ready:
            raise ConfigError(f"the graph has a cycle among nodes {sorted(pending)}")
        for key in ready:
            entry = pending.pop(key)
            inputs = {n: results[v[0]][v[1]] if _is_link(v) else v for n, v in entry["inputs"].items()}
            results[key] = _call(classes[entry["class_type"]], inputs)
    return results


def run(config: Mapping[str, Any], out_dir: str | os.PathLike[str], classes: Mapping[str, type],
        steps: int | None = None) -> tuple[dict[str, Any], Any]:
    """Train the exported run in this process (one rank of a torchrun job, or alone) into `out_dir`, executing its
    graph with `classes` (ComfyUI's node classes with the pack's declarations over them); rank 0 saves
    the weights there. Returns the run's summary (with the saved file's path on rank 0) and the trained weights
    (specs.TrainedWeights; every rank holds the same)."""
    import torch

    from .. import distributed
    from . import host, training
    from .files import save_weights
    from .live import LiveSettings

    train = config["train"]
    with torch.inference_mode():  # as ComfyUI runs nodes
        results = execute(config["graph"], classes)
    value = {name: results[link[0]][link[1]] for name, link in config["inputs"].items()}
    prompts = host.parse_prompts(train["prompts"]) if str(train.get("prompts", "")).strip() else None
    opts = training.TrainOptions(steps=int(steps if steps is not None else train["steps"]),
                                 checkpoint_dir=str(Path(out_dir).expanduser()), batch_size=train["batch_size"],
                                 lr_generator=train["learning_rate"], seed=train["seed"], width=train["width"],
                                 height=train["height"], checkpoint_every=train["checkpoint_every"],
                                 ema_decay=train.get("ema_decay", 0.95),
                                 gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
                                 bf16=bool(train.get("bf16", False)),
                                 live=LiveSettings(every=0))
    with torch.inference_mode():
        result = training.train(value["loss"], value["model"], opts, vae=value.get("vae"), prompts=prompts,
                                clip=value.get("clip"))
    summary = dict(result.summary, world_size=distributed.world_size())
    if distributed.is_main():
        summary["saved"] = str(save_weights(result.weights, opts.checkpoint_dir, train["filename_prefix"],
                                            {"diffinstruct.world_size": str(distributed.world_size())}))
    return summary, result.weights


def import_comfyui(path: str | os.PathLike[str], custom_nodes: list[str]) -> dict[str, type]:
    """ComfyUI at `path` imported as its main.py would (CPU when no GPU is visible), its core nodes and the node
    packs in `custom_nodes` loaded; returns its NODE_CLASS_MAPPINGS."""
    import asyncio
    import importlib
    import sys

    import torch

    root = Path(path).expanduser().resolve()
    if not (root / "comfy").is_dir() or not (root / "nodes.py").is_file():
        raise ConfigError(f"--comfyui {root} is not a ComfyUI folder (no comfy/ and nodes.py)")
    sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()  # before comfy.model_management is imported
    importlib.import_module("utils.install_util")  # ComfyUI's utils package before nodes puts comfy/ on the path
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    for folder in custom_nodes:
        if not asyncio.run(nodes.load_custom_node(str(Path(folder).expanduser().resolve()))):
            raise ConfigError(f"--custom-node {folder}: ComfyUI could not load it as a node pack")
    return dict(nodes.NODE_CLASS_MAPPINGS)


def command(args: Any, pack_nodes: Mapping[str, type]) -> int:
    """`diffinstruct comfyui train --config RUN.json --comfyui DIR --out DIR [--custom-node DIR]... [--steps N]`;
    `pack_nodes`: the pack's node declarations (registry.DEFINITIONS), called directly instead of their V3 nodes."""
    import torch

    from .. import distributed

    if not args.config:
        raise ConfigError("--config is required: the run config DI++ Export Run wrote")
    config = read_config(args.config)
    if not args.out:
        raise ConfigError("--out is required: the folder for the run's checkpoints and the saved weights")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    # under torchrun: this rank of the job (gloo on the CPU; on GPUs cuda:LOCAL_RANK becomes the current device
    # before ComfyUI is imported, so its model management puts this rank's models there)
    env = distributed.init_from_env("cuda" if torch.cuda.is_available() else "cpu")
    try:
        classes = {**import_comfyui(args.comfyui, list(args.custom_node or [])), **pack_nodes}
        summary, _ = run(config, out, classes, steps=args.steps)
    finally:
        distributed.cleanup(env)
    if env.is_main:
        print(json.dumps(summary, indent=2, default=str))
    return 0
