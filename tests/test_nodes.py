"""The ComfyUI node pack without ComfyUI: schemas, and every node executed on the package's tiny models."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import comfy_tiny as tiny
import pytest
import torch

from diffinstruct.errors import ConfigError, UnsupportedModel

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "a red car\na blue sky\n# a comment\n\ngreen grass"


def load_pack():
    """Import the repository root as ComfyUI does: a package named by its path."""
    name = str(ROOT).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS


def node(name):
    return NODES[name]()


@pytest.fixture(scope="module")
def objects():
    torch.manual_seed(0)
    return {"model": tiny.tiny_model(), "clip": tiny.TinyTextEncoder(), "vae": tiny.TinyDecoder()}


def reward(name="brightness", weight=1.0):
    return node("DIPPReward").build(name, weight, "")[0]


# ============================================================================================== schemas
def test_every_node_has_a_complete_schema():
    assert len(NODES) == 14
    for node_id, cls in NODES.items():
        assert node_id.startswith("DIPP") and cls.CATEGORY == "Diff-Instruct++"
        assert len(cls.DESCRIPTION) > 40, node_id
        assert node_id in PACK.NODE_DISPLAY_NAME_MAPPINGS
        types = cls.INPUT_TYPES()
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                assert isinstance(spec[1].get("tooltip"), str) and spec[1]["tooltip"], (node_id, name)
                assert name in params, (node_id, name)
                if section == "optional":
                    assert params[name].default is not inspect.Parameter.empty, (node_id, name)
        for name in params:
            if name != "self":
                assert any(name in types.get(s, {}) for s in ("required", "optional", "hidden")), (node_id, name)
        n = len(cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == n and len(cls.OUTPUT_TOOLTIPS) == n, node_id


def test_training_nodes_never_return_a_cached_result():
    for name in ("DIPPTrain", "DIPPAlign"):
        assert math.isnan(NODES[name].IS_CHANGED(steps=3))


def test_pack_imports_without_comfy():
    init = str(ROOT / "__init__.py")
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('pack', {init!r});"
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m);"
            "assert len(m.NODE_CLASS_MAPPINGS) == 14;"
            "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules), 'comfy imported';"
            "assert 'nodes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_pack_falls_back_to_the_reference_kernels_without_the_extension(tmp_path):
    """Cloned into custom_nodes/ without a build: one warning, and the same run on the PyTorch reference."""
    code = f"""
import json, sys
sys.modules["diffinstruct._core"] = None  # as if the C extension were not built
sys.path.insert(0, {str(ROOT / "tests")!r})
import test_nodes as tn
from diffinstruct.kernels import backend
assert not backend.HAVE_EXTENSION
objs = {{"model": tn.tiny.tiny_model(), "clip": tn.tiny.TinyTextEncoder(), "vae": tn.tiny.TinyDecoder()}}
out = tn.node("DIPPAlign").align(objs["model"], objs["clip"], objs["vae"], tn.PROMPTS, tn.reward(), 1000.0, 1.5, 2,
                                 batch_size=2, learning_rate=1e-2, width=32, height=32,
                                 checkpoint_dir=sys.argv[1])["result"]
print(json.dumps(json.loads(out[4])["reward_first"]))
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ref")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("NoExtensionWarning: diffinstruct: the C extension is not built") == 1
    objs = {"model": tiny.tiny_model(), "clip": tiny.TinyTextEncoder(), "vae": tiny.TinyDecoder()}
    out = node("DIPPAlign").align(objs["model"], objs["clip"], objs["vae"], PROMPTS, reward(), 1000.0, 1.5, 2,
                                  batch_size=2, learning_rate=1e-2, width=32, height=32,
                                  checkpoint_dir=str(tmp_path / "c"))["result"]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == pytest.approx(json.loads(out[4])["reward_first"],
                                                                              abs=1e-5)


# ============================================================================================== execution
def composed_loss(objects, alpha=1000.0, mode="lora", method="DI++", reward_spec=None, omega=1.5):
    model, clip = objects["model"], objects["clip"]
    positive = [[clip("a red car"), {}]]
    negative = [[clip(""), {}]]
    ref = node("DIPPReferenceScore").build(model, positive, negative, omega)[0]
    ta = node("DIPPTAModel").build(model, mode, 4, 1e-3)[0]
    return node("DIPPGeneratorLoss").build(ref, ta, alpha, method, "normalized", -2.0, 2.0,
                                          reward_spec if reward_spec is not None else reward())[0]


def train(objects, loss, folder, steps=6, **kw):
    args = dict(batch_size=2, learning_rate=1e-2, seed=0, width=32, height=32, checkpoint_dir=str(folder),
                checkpoint_every=2, resume=True, clip=objects["clip"])
    args.update(kw)
    model = args.pop("model", objects["model"])
    return node("DIPPTrain").train(model, loss, objects["vae"], args.pop("prompts", PROMPTS), steps, **args)["result"]


def evaluate(objects, model, reward_spec, seed=0):
    return node("DIPPEvaluate").evaluate(model, objects["clip"], objects["vae"], PROMPTS, reward_spec, seed, 2, 32, 32)


def test_composed_pipeline_trains_saves_samples_and_evaluates(objects, tmp_path):
    combined = node("DIPPRewardCombine").combine(reward("brightness"), 1.0, reward("saturation"), 0.5)[0]
    assert combined.spec_string() == "1*brightness+0.5*saturation"
    before = evaluate(objects, objects["model"], reward())
    model, weights, curves, preview, summary = train(objects, composed_loss(objects, reward_spec=combined),
                                                     tmp_path / "run")
    info = json.loads(summary)
    assert info["start_step"] == 0 and info["steps"] == 6
    assert curves.shape[0] == 1 and curves.shape[-1] == 3 and preview.shape == (3, 32, 32, 3)
    assert 0 <= float(preview.min()) and float(preview.max()) <= 1
    assert weights.kind == "lora" and any(k.endswith(".lora_up.weight") for k in weights.tensors)
    for key in ("diffinstruct.method", "diffinstruct.alpha", "diffinstruct.omega", "diffinstruct.steps",
                "diffinstruct.base_model"):
        assert key in weights.metadata
    assert weights.metadata["diffinstruct.omega"] == "1.5"
    # the aligned model differs from the base, and evaluation sees a higher brightness
    after = evaluate(objects, model, reward())
    assert after["result"][0] > before["result"][0]
    assert "a blue sky" in after["result"][2]
    latent, image = node("DIPPOneStepSample").sample(model, [[objects["clip"]("a red car"), {}]], 1, 32, 32, 2,
                                                     objects["vae"])
    assert latent["samples"].shape == (2, 4, 4, 4) and image.shape == (2, 32, 32, 3)
    path = node("DIPPSave").save(weights, "dipp/test", str(tmp_path / "loras"))["result"][0]
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata()["diffinstruct.method"] == "dipp"
        assert set(f.keys()) == set(weights.tensors)
    assert not [p for p in (tmp_path / "loras" / "dipp").iterdir() if p.name.startswith(".")]


def test_align_one_click_raises_the_reward(objects, tmp_path):
    before = evaluate(objects, objects["model"], reward())["result"][0]
    out = node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 1000.0, 1.0,
                                  8, batch_size=2, learning_rate=1e-2, ta_learning_rate=1e-3, width=32, height=32,
                                  checkpoint_dir=str(tmp_path / "align"))["result"]
    after = evaluate(objects, out[0], reward())["result"][0]
    assert after > before + 0.02, (before, after)


def test_full_mode_and_di_star(objects, tmp_path):
    loss = composed_loss(objects, mode="full", method="DI*", alpha=100.0)
    # no prompts: trains on the reference score's positive conditioning
    model, weights, *_ = train(objects, loss, tmp_path / "full", steps=2, prompts="", clip=None)
    assert weights.kind == "full" and "net.conv_in.weight" in weights.tensors
    assert not torch.equal(model.net.conv_in.weight, objects["model"].net.conv_in.weight)
    loss_di = composed_loss(objects, method="DI", alpha=0.0)
    train(objects, loss_di, tmp_path / "di", steps=2)


def test_a_second_full_mode_train_continues_the_first_runs_ta(objects, tmp_path, monkeypatch):
    """Stage 1 -> stage 3 as the tiny demo chains them: the generator MODEL of a full-mode Train carries its TA, and
    a Train from that MODEL starts its TA there (the demo's stage 3 does the same); a LoRA run carries none."""
    from diffinstruct.comfyui import training as comfy_train

    loss = composed_loss(objects, mode="full", method="DI", alpha=0.0)
    first, *_, summary = train(objects, loss, tmp_path / "s1", steps=2)
    assert json.loads(summary)["ta_start"] == "reference"
    carried = comfy_train.carried_ta(first)
    assert carried is not None and set(carried) == set(objects["model"].state_dict())
    assert any(not torch.equal(carried[k], v) for k, v in objects["model"].state_dict().items())  # it trained
    seen = {}
    original = comfy_train.carry_over_ta

    def spy(ta, generator_model):  # the TA the second run starts from, as loaded
        where = original(ta, generator_model)
        seen.update({k: v.detach().clone() for k, v in ta.state_dict().items()})
        return where

    monkeypatch.setattr(comfy_train, "carry_over_ta", spy)
    out = train(objects, loss, tmp_path / "s3", steps=2, model=first)
    monkeypatch.undo()
    assert json.loads(out[4])["ta_start"] == "carried over from the generator's run" and seen
    assert all(torch.equal(seen[k], carried[k]) for k in carried)
    lora, *_, lora_summary = train(objects, composed_loss(objects), tmp_path / "lora", steps=2)
    assert comfy_train.carried_ta(lora) is None and json.loads(lora_summary)["ta_start"] == "reference"


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_v_prediction_and_flow_models(objects, prediction, tmp_path):
    model = tiny.tiny_model(1, prediction=prediction)
    objs = dict(objects, model=model)
    out = node("DIPPAlign").align(model, objects["clip"], objects["vae"], PROMPTS, reward(), 1000.0, 2.0, 3,
                                  batch_size=2, learning_rate=1e-2, width=32, height=32,
                                  checkpoint_dir=str(tmp_path))["result"]
    assert json.loads(out[4])["process"] == ("flow" if prediction == "flow" else "ve")
    assert out[0].diffinstruct_sigma_init == (2.5 if prediction == "v" else model.sigma_max)
    cond = [[objects["clip"]("a red car"), {}]]
    a = node("DIPPOneStepSample").sample(out[0], cond, 0, 32, 32, 2)[0]["samples"]
    b = node("DIPPOneStepSample").sample(model, cond, 0, 32, 32, 2)[0]["samples"]
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4
    assert evaluate(objs, out[0], reward())["result"][0] > evaluate(objs, model, reward())["result"][0]


def test_interrupt_leaves_a_checkpoint_and_resume_matches(objects, tmp_path, monkeypatch):
    from diffinstruct.comfyui import host as host

    loss = composed_loss(objects)
    straight = train(objects, loss, tmp_path / "straight", steps=5, checkpoint_every=5)[1]

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def cancel_at_step_3(self):
        calls["n"] += 1
        if calls["n"] == 4:  # before the 4th step: 3 steps are done
            raise Interrupted

    monkeypatch.setattr(host.HostHooks, "check_interrupt", cancel_at_step_3)
    with pytest.raises(Interrupted):
        train(objects, loss, tmp_path / "run", steps=5, checkpoint_every=5)
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000003"
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(objects, loss, tmp_path / "run", steps=5, resume=False)
    model, resumed, _, _, summary = train(objects, loss, tmp_path / "run", steps=5, checkpoint_every=5)
    assert json.loads(summary)["start_step"] == 3
    for key, value in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], value, rtol=0, atol=0)


def test_training_copies_are_released_after_the_run(objects, tmp_path, monkeypatch):
    import gc
    import weakref

    from diffinstruct.comfyui import host as host

    copies = []
    original = host.trainable_copy

    def tracked(*args, **kwargs):
        out = original(*args, **kwargs)
        copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(host, "trainable_copy", tracked)
    result = train(objects, composed_loss(objects), tmp_path / "run", steps=1)
    gc.collect()
    assert copies and all(ref() is None for ref in copies)
    assert result[0] is not objects["model"]
    # a cancelled run too, while its exception (and traceback) is still held
    copies.clear()

    def cancel(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(host.HostHooks, "check_interrupt", cancel)
    try:
        train(objects, composed_loss(objects), tmp_path / "cancelled", steps=2)
    except KeyboardInterrupt as exc:
        held = exc
    gc.collect()
    assert held is not None and copies and all(ref() is None for ref in copies)


def test_shipped_api_workflows_use_the_node_schemas():
    workflows = sorted((ROOT / "workflows" / "api").glob("*_api.json"))
    assert [p.name for p in workflows] == ["align_one_click_api.json", "composed_pipeline_api.json",
                                           "evaluate_before_after_api.json", "tiny_demo_api.json"]
    for path in workflows:
        prompt = json.loads(path.read_text())
        assert json.loads((ROOT / "workflows" / path.name.replace("_api", "")).read_text())["nodes"]
        for node_id, entry in prompt.items():
            cls = NODES.get(entry["class_type"])
            if cls is None:
                continue  # a core ComfyUI node
            spec = cls.INPUT_TYPES()
            assert set(spec["required"]) <= set(entry["inputs"]), (path.name, node_id)
            assert set(entry["inputs"]) <= set(spec["required"]) | set(spec.get("optional", {})), (path.name, node_id)
            for name, value in entry["inputs"].items():
                if isinstance(value, list):
                    assert value[0] in prompt, (path.name, node_id, name)


# ============================================================================================== bad input
def test_bad_inputs_give_clear_errors(objects, tmp_path):
    model, clip = objects["model"], objects["clip"]
    cond = [[clip("x"), {}]]
    with pytest.raises(ValueError, match="prompt list is empty"):
        node("DIPPAlign").align(model, clip, objects["vae"], " \n# only a comment\n", reward(), 10.0, 1.0, 2,
                                checkpoint_dir=str(tmp_path / "a"))["result"]
    with pytest.raises(ConfigError, match="alpha"):
        composed_loss(objects, alpha=-1.0)
    with pytest.raises(ConfigError, match="alpha"):
        composed_loss(objects, alpha=float("nan"))
    with pytest.raises(ConfigError, match="omega"):
        node("DIPPReferenceScore").build(model, cond, cond, 0.5)
    with pytest.raises(ConfigError, match="needs a reward"):
        node("DIPPGeneratorLoss").build(node("DIPPReferenceScore").build(model, cond, cond, 1.0)[0],
                                        node("DIPPTAModel").build(model, "lora", 4, 1e-3)[0], 5.0, "DI++",
                                        "normalized", -2.0, 2.0, None)
    with pytest.raises(UnsupportedModel, match="SD1.5"):
        node("DIPPReferenceScore").build(torch.nn.Linear(2, 2), cond, cond, 1.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        node("DIPPReward").build("pickscore", 1.0, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="unknown reward"):
        node("DIPPReward").build("nonsense", 1.0, "")
    with pytest.raises(ConfigError, match="multiple of 8"):
        train(objects, composed_loss(objects), tmp_path / "b", steps=1, width=30)


def test_missing_reward_weights_name_where_to_put_them(objects, tmp_path, monkeypatch):
    from diffinstruct.errors import RewardWeightsNotFound

    monkeypatch.setenv("DIFFINSTRUCT_MODELS_DIR", str(tmp_path))
    # on the Reward node the user wired, at queue time (VALIDATE_INPUTS) and when it runs, not later on Align
    message = NODES["DIPPReward"].VALIDATE_INPUTS("pickscore", "")
    assert isinstance(message, str) and "rewards/pickscore" in message
    with pytest.raises(RewardWeightsNotFound, match="rewards/pickscore"):
        node("DIPPReward").build("pickscore", 1.0, "")
    assert NODES["DIPPReward"].VALIDATE_INPUTS("brightness", "") is True
    (tmp_path / "rewards" / "pickscore").mkdir(parents=True)
    assert NODES["DIPPReward"].VALIDATE_INPUTS("pickscore", "") is True
    assert "does not exist" in NODES["DIPPReward"].VALIDATE_INPUTS("aesthetic", str(tmp_path / "nope.safetensors"))


def test_save_failure_leaves_no_file(objects, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    weights = train(objects, composed_loss(objects), tmp_path / "run", steps=1)[1]

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        node("DIPPSave").save(weights, "dipp/x", str(tmp_path / "out"))
    assert list((tmp_path / "out" / "dipp").iterdir()) == []
    with pytest.raises(ValueError, match="relative name"):
        node("DIPPSave").save(weights, "../escape", str(tmp_path / "out"))
