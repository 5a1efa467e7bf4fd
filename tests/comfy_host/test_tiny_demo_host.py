"""The tiny demo workflow (workflows/api/tiny_demo_api.json) in real ComfyUI: the pack loaded by ComfyUI's loader,
the prompt validated and run by its PromptExecutor, with its own CLIP Text Encode and Preview Image nodes."""

from __future__ import annotations

import json

from test_comfy_host import API, WORKFLOWS, errors, host, run, ui_to_api  # noqa: F401 - host is a fixture

# The learned reward is a Bradley-Terry score (unbounded); measured in CI (tests/test_nodes_tiny_demo.py) with the
# same workflow: -0.54 (DI) -> 4.99 (DI++). A margin well below that.
MIN_GAIN = 0.3
MAX_FIDELITY_LOSS = 5.0  # percentage points of attribute accuracy; measured 96.1 -> 95.3


def test_tiny_demo_ui_workflow_matches_its_api_twin(host):  # noqa: F811
    ui = json.loads((WORKFLOWS / "tiny_demo.json").read_text())
    api = json.loads((API / "tiny_demo_api.json").read_text())
    assert ui_to_api(host, ui) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def test_tiny_demo_workflow_raises_the_learned_reward_in_comfyui(host):  # noqa: F811
    prompt = json.loads((API / "tiny_demo_api.json").read_text())
    for key, node in prompt.items():  # the runs' folders in the test's folder, not ComfyUI's output folder
        for name in ("checkpoint_dir", "folder"):
            if name in node["inputs"]:
                node["inputs"][name] = str(host.tmp / f"tiny_demo-{key}-{name}")
    executor, server = run(host, prompt)
    assert not errors(server), errors(server)
    outputs = executor.history_result["outputs"]
    title = {v["_meta"]["title"]: k for k, v in prompt.items()}
    before, after = outputs[title["Before (DI)"]]["mean"][0], outputs[title["After (DI++)"]]["mean"][0]
    fid_before = outputs[title["Fidelity: DI"]]["attribute_accuracy"][0]
    fid_after = outputs[title["Fidelity: DI++"]]["attribute_accuracy"][0]
    fit = json.loads(outputs[title["Stage 2: learned reward (hidden taste)"]]["record"][0])
    assert "agreement with taste" in outputs[title["Stage 2: learned reward (hidden taste)"]]["text"][0]
    print(f"\ntiny demo in ComfyUI: learned reward DI {before:.3f} -> DI++ {after:.3f}; attribute accuracy "
          f"{fid_before:.1f}% -> {fid_after:.1f}%; reward agrees with the hidden taste on "
          f"{100 * fit['agreement_with_taste']:.1f}% of fresh pairs")
    assert after - before >= MIN_GAIN, (before, after)
    assert fid_after >= fid_before - MAX_FIDELITY_LOSS, (fid_before, fid_after)
    for key in (title["Preview: DI"], title["Preview: DI++"], title["Curves: DI++"]):
        assert outputs[key]["images"], key  # Preview Image wrote the pictures
    train_id = title["Stage 3: DI++ alignment"]
    steps = prompt[train_id]["inputs"]["steps"]
    assert [v for v, _, node in host.progress if node == train_id] == list(range(0, steps + 1))
