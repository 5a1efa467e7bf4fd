"""Graph -> cluster (comfyui/cluster.py) without ComfyUI: DI++ Export Run writes the part of the queued tiny-demo
workflow a run needs, and that config trains under torchrun (2 CPU processes, gloo) with cluster.run, rank 0
saving the LoRA. The real path (ComfyUI imported by `diffinstruct comfyui train`, its core nodes, the LoRA loaded
back through core Load LoRA) runs in the real-host suite (tests/comfy_host/test_comfy_host.py).

This file is also the worker: torchrun runs it as a script (`python tests/test_comfy_cluster.py CONFIG OUT`).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from diffinstruct.comfyui import cluster
from diffinstruct.comfyui.registry import DEFINITIONS
from diffinstruct.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "tiny_demo_api.json"
EXPORT_ID = "99"
STEPS = 4


class CLIPTextEncode:
    """ComfyUI's core CLIP Text Encode, as its nodes.py defines it (ComfyUI is not installed for `make test`)."""

    FUNCTION = "encode"

    def encode(self, clip: Any, text: str) -> tuple[Any]:
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


NODE_CLASSES = {**DEFINITIONS, "CLIPTextEncode": CLIPTextEncode}  # ComfyUI's mapping, with the pack's nodes


def queued_prompt(loss: str = "6") -> dict[str, Any]:
    """The tiny-demo workflow with an export node on stage 1's loss, its TA as LoRA on the shared base."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt["5"]["inputs"].update(mode="lora", rank=4)
    prompt[EXPORT_ID] = {"class_type": "DIPPExportRun", "inputs": {
        "model": ["1", 0], "loss": [loss, 0], "vae": ["1", 2], "clip": ["1", 1],
        "prompts": "a large red circle at the top left\na small blue square at the bottom right", "steps": STEPS,
        "batch_size": 2, "learning_rate": 1e-3, "seed": 0, "width": 16, "height": 16, "checkpoint_every": 2,
        "filename_prefix": "cluster/tiny", "ema_decay": 0.95}}
    return prompt


def export(prompt: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    inputs = {k: v for k, v in prompt[EXPORT_ID]["inputs"].items() if not isinstance(v, list)}
    out = DEFINITIONS["DIPPExportRun"]().export(None, None, None, unique_id=EXPORT_ID, prompt=prompt, **inputs)
    path = Path(out["result"][0])
    return path, json.loads(path.read_text())


def test_export_writes_the_nodes_the_run_needs_and_nothing_else():
    path, config = export(queued_prompt())
    assert config == cluster.read_config(path) and config["format"] == cluster.FORMAT
    assert sorted(config["graph"], key=int) == ["1", "2", "3", "4", "5", "6"]  # models, encoders, ref, TA, loss
    assert config["graph"]["5"] == {"class_type": "DIPPTAModel",
                                    "inputs": {"model": ["1", 0], "mode": "lora", "rank": 4, "learning_rate": 0.001}}
    assert config["inputs"] == {"model": ["1", 0], "loss": ["6", 0], "vae": ["1", 2], "clip": ["1", 1]}
    assert config["train"]["steps"] == STEPS and config["train"]["filename_prefix"] == "cluster/tiny"


def test_a_run_that_needs_a_training_node_is_refused():
    with pytest.raises(ConfigError, match="DIPPTrain, which trains when it runs"):
        export(queued_prompt(loss="9"))  # stage 3's loss: its reward was fitted to stage 1's Train
    with pytest.raises(ConfigError, match="run it from ComfyUI"):
        cluster.export_config(None, EXPORT_ID, {})


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="DI\\+\\+ Export Run writes one"):
        cluster.read_config(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a run exported by DI\\+\\+ Export Run"):
        cluster.read_config(tmp_path / "other.json")
    _, config = export(queued_prompt())
    graph = copy.deepcopy(config["graph"])
    graph["2"]["class_type"] = "NoSuchNode"
    with pytest.raises(ConfigError, match="no node NoSuchNode"):
        cluster.execute(graph, NODE_CLASSES)


def test_the_exported_run_trains_under_torchrun_and_saves_a_lora(tmp_path):
    from test_distributed import torchrun

    from diffinstruct.comfyui.files import merge_lora
    from diffinstruct.tiny import load_teacher

    path, _ = export(queued_prompt())
    out = tmp_path / "run"
    proc = torchrun([str(Path(__file__).resolve()), str(path), str(out)], cwd=tmp_path, timeout=300)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert (out / "latest").read_text().strip() == f"step-{STEPS:06d}"  # rank 0 wrote the checkpoints
    saved = Path(summary["saved"])
    assert saved.parent == out / "cluster" and saved.name == "tiny_00001.safetensors"
    from safetensors.torch import load_file, safe_open

    lora = load_file(saved)
    with safe_open(saved, "pt") as f:
        assert f.metadata()["diffinstruct.world_size"] == "2"
    # every rank ends with the same weights (averaged gradients), which are not those of one process alone: the
    # second rank's batches count
    digests = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert digests[0] == digests[1]
    assert digest(lora) == digests[0]  # rank 0 saved what it holds
    alone, _ = cluster.run(cluster.read_config(path), tmp_path / "alone", NODE_CLASSES)
    assert digest(load_file(alone["saved"])) != digests[0]
    teacher = load_teacher()
    base = copy.deepcopy(teacher)
    assert merge_lora(teacher, lora) > 0
    moved = max(float((a - b).abs().max()) for a, b in zip(teacher.state_dict().values(),
                                                          base.state_dict().values(), strict=True))
    assert moved > 0, "the LoRA changes nothing"


def digest(tensors: dict[str, torch.Tensor]) -> list[float]:
    return [float(tensors[k].double().sum()) for k in sorted(tensors)]


def _worker(config_path: str, out: str) -> None:
    from diffinstruct import distributed

    torch.set_num_threads(1)
    env = distributed.init_from_env()
    try:
        summary, weights = cluster.run(cluster.read_config(config_path), out, NODE_CLASSES)
    finally:
        distributed.cleanup(env)
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(digest(weights.tensors)))  # what this rank holds
    if env.is_main:
        print(json.dumps(summary, default=str))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
