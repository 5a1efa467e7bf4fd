"""The default run folder (empty checkpoint_dir) is named after the queued run: the same workflow queued again
finds the same folder (so it resumes), raising steps keeps it, and any change to what is trained gives another."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from diffinstruct.comfyui import runs as comfy_runs

ROOT = Path(__file__).resolve().parents[1]
PROMPT = json.loads((ROOT / "workflows" / "api" / "align_one_click_api.json").read_text())
ALIGN = next(k for k, v in PROMPT.items() if v["class_type"] == "DIPPAlign")
REWARD = next(k for k, v in PROMPT.items() if v["class_type"] == "DIPPReward")


def changed(node_id: str, **inputs) -> dict:
    prompt = copy.deepcopy(PROMPT)
    prompt[node_id]["inputs"].update(inputs)
    return prompt


def test_the_same_run_gets_the_same_folder():
    key = comfy_runs.run_key(PROMPT, ALIGN)
    assert key is not None and len(key) == comfy_runs.KEY_CHARS
    assert comfy_runs.run_key(copy.deepcopy(PROMPT), ALIGN) == key
    for name, value in (("steps", 5000), ("checkpoint_every", 7), ("preview_every", 0), ("diversity_warning", 0.1),
                        ("gradient_checkpointing", True)):
        assert comfy_runs.run_key(changed(ALIGN, **{name: value}), ALIGN) == key, name
    shown = changed(ALIGN, dipp_status="stopped after 3 steps")  # the canvas's status box is not an input
    assert comfy_runs.run_key(shown, ALIGN) == key
    extra = copy.deepcopy(PROMPT)  # a node elsewhere in the graph does not touch the run
    extra["99"] = {"class_type": "PreviewImage", "inputs": {"images": [ALIGN, 3]}}
    assert comfy_runs.run_key(extra, ALIGN) == key
    assert comfy_runs.default_run_dir("align", PROMPT, ALIGN).endswith(f"diffinstruct_runs/align-{key}")


def test_what_is_trained_changes_the_folder():
    key = comfy_runs.run_key(PROMPT, ALIGN)
    for prompt in (changed(ALIGN, seed=1), changed(ALIGN, alpha=3.0), changed(ALIGN, bf16=True),
                   changed(REWARD, reward="saturation"),
                   changed(next(k for k, v in PROMPT.items() if v["class_type"] == "CheckpointLoaderSimple"),
                           ckpt_name="other.safetensors")):
        assert comfy_runs.run_key(prompt, ALIGN) != key
    # "steps" of an upstream node is part of what that node makes, so it counts there
    upstream = copy.deepcopy(PROMPT)
    upstream[REWARD]["inputs"]["steps"] = 3
    assert comfy_runs.run_key(upstream, ALIGN) != key


def test_without_a_prompt_each_run_gets_a_fresh_folder():
    assert comfy_runs.run_key(None, ALIGN) is None and comfy_runs.run_key(PROMPT, "nope") is None
    a, b = comfy_runs.default_run_dir("align"), comfy_runs.default_run_dir("align")
    assert a != b and Path(a).name.startswith("align-")
