"""The node pack inside a real ComfyUI (a local checkout named by COMFYUI_PATH, CPU torch).

ComfyUI's own custom-node loader loads the pack (the cloned-repository route and the wheel's loader file),
and ComfyUI's executor runs every API-format workflow of workflows/api/ on a tiny SD1.5-architecture model with
the TAESD VAE; the workflows' CheckpointLoaderSimple is swapped for a test node that builds that model in
memory, and sizes and step counts are reduced so each runs in seconds on a CPU.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy").is_dir():
    pytest.skip("real-ComfyUI tests skipped: set COMFYUI_PATH to a ComfyUI checkout (with its requirements and CPU "
                "torch installed) to run them", allow_module_level=True)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKFLOWS = ROOT / "workflows"  # what the Templates browser lists (UI format)
API = WORKFLOWS / "api"  # their API-format twins, one level down so that they are not listed
TINY_LOADER = "TestTinySD15Checkpoint"
SIZE = 64  # pixels: 8 x 8 latents
ALIGN_STEPS = 30
# brightness is in [0, 1]; measured 0.4077 -> 0.5133 (+0.106) with torch's AVX2 kernels, -> 0.5326 (+0.125) with
# its AVX-512 ones, in 30 steps at the generator lr 3e-3 below. At 1e-2 the run was chaotic: +0.054 on AVX2 and
# +0.014 on AVX-512 from the same seeds, so the rounding of the CPU's kernels decided whether it passed.
MIN_GAIN = 0.04


class ServerStub:
    """What PromptExecutor needs of ComfyUI's server: it records every message."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    sys.path.insert(0, COMFY)
    try:
        from comfy.cli_args import args

        args.cpu = True  # before comfy.model_management is imported (docs/COMFYUI.md section 5)
        # ComfyUI's top-level utils package first, as main.py does: its nodes module puts comfy/ (and so
        # comfy/utils.py) on sys.path, after which the server's `utils.install_util` would not import
        importlib.import_module("utils.install_util")
        import comfy.model_management
        import comfy.utils
        import execution
        import folder_paths
        import server as comfy_server_module

        import nodes as comfy_nodes
    except ImportError as exc:
        pytest.skip(f"real-ComfyUI tests skipped: ComfyUI at {COMFY} does not import here ({exc})")
    assert Path(comfy_nodes.__file__).resolve().parent == Path(COMFY).resolve()
    tmp = tmp_path_factory.mktemp("comfy")
    folder_paths.set_output_directory(str(tmp))  # the tests' folders (host.tmp / ...) are where nodes may write
    folder_paths.set_temp_directory(str(tmp / "temp"))
    for kind in ("loras", "diffusion_models"):  # Save's default folders, away from the checkout's models/
        folder_paths.add_model_folder_path(kind, str(tmp / kind), is_default=True)
        (tmp / kind).mkdir()
    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(comfy_nodes.load_custom_node(str(ROOT))), "ComfyUI could not load the repository as a pack"
    assert asyncio.run(comfy_nodes.load_custom_node(str(HERE / "testing_nodes" / "dipp_test_nodes")))
    progress: list[tuple[int, int, str | None]] = []
    previews: list[tuple[int, str | None, object]] = []

    def hook(value, total, preview_image, prompt_id=None, node_id=None):  # what main.hijack_progress installs
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.append((value, total, node_id))
        if preview_image is not None:
            previews.append((value, node_id, preview_image))
        if ns.interrupt_at is not None and value == ns.interrupt_at:
            comfy.model_management.interrupt_current_processing(True)  # the UI's Cancel button

    comfy.utils.set_progress_bar_global_hook(hook)
    status = ServerStub()  # the status events to the canvas go through PromptServer.instance
    comfy_server_module.PromptServer.instance = status
    ns = SimpleNamespace(nodes=comfy_nodes, execution=execution, folder_paths=folder_paths, mm=comfy.model_management,
                         tmp=tmp, progress=progress, previews=previews, status=status, interrupt_at=None)
    return ns


def run(host, prompt: dict, executor=None) -> tuple[object, ServerStub]:
    """Validate and execute `prompt` (with a new executor, or `executor` and its caches)."""
    prompt = copy.deepcopy(prompt)  # the executor annotates it (is_changed); the server parses each queued prompt anew
    server = ServerStub()
    if executor is None:
        executor = host.execution.PromptExecutor(server)
    executor.server = server
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(host.execution.validate_prompt(prompt_id, prompt, None))
    assert valid[0], (valid[1], valid[3])
    host.progress.clear()
    host.previews.clear()
    host.status.messages.clear()
    executor.execute(prompt, prompt_id, {"client_id": "test"}, valid[2])  # a client: errors are sent to it
    return executor, server


def run_dir(host, name: str) -> Path:
    """A new folder inside ComfyUI's output folder (nodes inside ComfyUI write only under its folders)."""
    folder = host.tmp / f"{name}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def declarations(host) -> dict:
    """ComfyUI's registered classes, with the pack's V3 nodes replaced by the declarations they are built from
    (their functions are what the V3 nodes' execute runs), for calling nodes directly in a test."""
    return {k: getattr(v, "DEFINITION", v) for k, v in host.nodes.NODE_CLASS_MAPPINGS.items()}


def errors(server: ServerStub) -> list[dict]:
    return [data for event, data in server.messages if event in ("execution_error", "execution_interrupted")]


def workflow(name: str, overrides: dict[str, dict]) -> dict:
    """An API-format workflow of workflows/api/ with the checkpoint loader swapped and the given inputs changed."""
    prompt = json.loads((API / f"{name}_api.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = TINY_LOADER, {"seed": 0}
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return prompt


def align_overrides(folder: Path, **extra) -> dict[str, dict]:
    return {"DIPPAlign": {"steps": ALIGN_STEPS, "width": SIZE, "height": SIZE, "batch_size": 2, "alpha": 1000.0,
                          "learning_rate": 3e-3, "ta_learning_rate": 1e-3, "checkpoint_dir": str(folder),
                          "checkpoint_every": 10, "preview_every": 10, **extra}}


def test_pack_loads_through_comfyui_loader(host):
    from diffinstruct.comfyui.host import is_comfy_model  # noqa: F401 - importable beside ComfyUI

    mappings = host.nodes.NODE_CLASS_MAPPINGS
    ours = sorted(k for k in mappings if k.startswith("DIPP"))
    assert len(ours) == 14
    from comfy_api.v0_0_2 import io

    for key in ours:
        assert issubclass(mappings[key], io.ComfyNode), key  # V3 nodes, pinned to comfy_api v0_0_2
        schema = mappings[key].GET_SCHEMA()
        assert schema.category == "Diff-Instruct++" and schema.node_id == key
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[key].startswith("DI++")
    align = mappings["DIPPAlign"].GET_SCHEMA()
    reward_input = next(i for i in align.inputs if i.id == "reward")
    assert reward_input.get_io_type() == "DIPP_REWARD"  # the pack's own socket types
    assert mappings["DIPPAlign"].fingerprint_inputs() != mappings["DIPPAlign"].fingerprint_inputs()
    assert "LoraLoader" in mappings and "KSampler" in mappings  # core nodes are intact


def test_bad_input_is_refused_at_queue_time_on_the_node_the_user_wired(host, monkeypatch):
    """A model reward whose weights are not installed fails on the Reward node, and a checkpoint_dir that is a
    file on Align, both when the prompt is queued (validation), before anything runs."""
    tmp_path = host.tmp / "bad_input"
    tmp_path.mkdir()
    monkeypatch.setenv("DIFFINSTRUCT_MODELS_DIR", str(tmp_path / "models"))
    prompt = workflow("align_one_click", align_overrides(tmp_path / "never"))
    reward_id = next(k for k, v in prompt.items() if v["class_type"] == "DIPPReward")
    align_id = next(k for k, v in prompt.items() if v["class_type"] == "DIPPAlign")
    prompt[reward_id]["inputs"]["reward"] = "imagereward"
    (tmp_path / "a_file").write_text("")
    prompt[align_id]["inputs"]["checkpoint_dir"] = str(tmp_path / "a_file")
    valid = asyncio.run(host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert not valid[0]
    node_errors = valid[3]
    assert set(node_errors) == {reward_id, align_id}, node_errors
    said = {k: " ".join(e["details"] for e in v["errors"]) for k, v in node_errors.items()}
    assert "rewards/imagereward" in said[reward_id] and "Nothing is downloaded" in said[reward_id]
    assert "is not a folder" in said[align_id]
    assert not (tmp_path / "never").exists()


def test_wheel_loader_folder_loads_through_comfyui(host, tmp_path):
    from diffinstruct import comfyui

    (tmp_path / "main.py").write_text("")
    loader = comfyui.install(tmp_path)
    shipped = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert sorted(p.stem for p in (loader / "workflows").glob("*.json")) == shipped
    before = dict(host.nodes.NODE_CLASS_MAPPINGS)
    for key in [k for k in before if k.startswith("DIPP")]:
        del host.nodes.NODE_CLASS_MAPPINGS[key]
    try:
        assert asyncio.run(host.nodes.load_custom_node(str(loader)))
        assert sorted(k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("DIPP")) == \
            sorted(k for k in before if k.startswith("DIPP"))
    finally:
        host.nodes.NODE_CLASS_MAPPINGS.update(before)


def test_ui_workflows_match_their_api_twins(host):
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(ui_path.read_text())
        api = json.loads((API / f"{ui_path.stem}_api.json").read_text())
        expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        assert ui_to_api(host, ui) == expected, ui_path.name


def ui_to_api(host, ui: dict) -> dict:
    """The frontend's graphToPrompt for these simple graphs: widgets in schema order, links as [id, slot]."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        cls = host.nodes.NODE_CLASS_MAPPINGS[node["type"]]
        spec = cls.INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        widgets = list(node["widgets_values"])
        inputs = {}
        for section in ("required", "optional"):
            for name, (typ, *_) in spec.get(section, {}).items():
                is_widget = isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                    if is_widget:
                        widgets.pop(0)
                elif is_widget:
                    inputs[name] = widgets.pop(0)
                    if name == "seed":
                        widgets.pop(0)  # control_after_generate
        assert not widgets, (node["type"], widgets)
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def test_one_click_workflow_raises_the_reward_and_its_lora_loads_in_comfyui(host):
    folder = host.tmp / "align_run"
    executor, server = run(host, workflow("align_one_click", align_overrides(folder)))
    assert not errors(server), errors(server)
    align_id = next(k for k, v in json.loads((API / "align_one_click_api.json").read_text()).items()
                    if v["class_type"] == "DIPPAlign")
    steps = [v for v, total, node in host.progress if node == align_id]
    assert steps == list(range(0, ALIGN_STEPS + 1)), "the progress bar must advance every step"
    # the live view: a picture with the progress every 10 steps, the status on the node, the numbers when done
    assert [(v, node) for v, node, _ in host.previews] == [(10, align_id), (20, align_id), (30, align_id)]
    kind, picture, max_size = host.previews[-1][2]
    assert kind == "JPEG" and max_size is None and picture.size[0] > 4 * 64
    events = [d for e, d in host.status.messages if e == "diffinstruct.progress" and d["node"] == align_id]
    assert [d["lines"][0] for d in events] == ["step 0 of 30", "step 1 of 30", "step 10 of 30", "step 20 of 30",
                                               "step 30 of 30"]  # start, the CPU estimate, the previews
    assert events[0]["warning"] and "training on the CPU" in events[0]["lines"][-1]  # ComfyUI runs with --cpu here
    assert any(line.startswith("WARNING: on the CPU one step took") for d in events for line in d["lines"])
    shown = executor.history_result["outputs"][align_id]["text"][0]
    print("\nAlign's text on the canvas:\n" + shown)
    assert shown.startswith("reward ") and f"checkpoint folder {folder}" in shown and "diversity" in shown
    saved = Path(executor.history_result["outputs"][next(k for k, v in workflow("align_one_click", {}).items()
                                                         if v["class_type"] == "DIPPSave")]["path"][0])
    assert saved.parent == host.tmp / "loras" / "diffinstruct" and saved.is_file()
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]
    assert (folder / "latest").read_text().strip() == f"step-{ALIGN_STEPS:06d}"

    # evaluation before / after: the saved LoRA goes through ComfyUI's own LoraLoader
    lora_name = f"diffinstruct/{saved.name}"
    evaluation = {"LoraLoader": {"lora_name": lora_name},
                  "DIPPEvaluate": {"width": SIZE, "height": SIZE, "samples_per_prompt": 2}}
    executor, server = run(host, workflow("evaluate_before_after", evaluation))
    assert not errors(server), errors(server)
    outputs = executor.history_result["outputs"]
    api = json.loads((API / "evaluate_before_after_api.json").read_text())
    by_title = {v["_meta"]["title"]: outputs[k] for k, v in api.items() if v["class_type"] == "DIPPEvaluate"}
    before, after = by_title["Before"]["mean"][0], by_title["After"]["mean"][0]
    print(f"\none-click alignment ({ALIGN_STEPS} steps, brightness, tiny SD1.5 + TAESD): mean reward over the "
          f"workflow's prompts {before:.4f} -> {after:.4f} (+{after - before:.4f})")
    assert after - before >= MIN_GAIN, (before, after)


def test_aligned_model_matches_comfyui_lora_loader(host):
    """The MODEL Align returns and the saved LoRA applied by ComfyUI's LoraLoader give the same samples."""
    import tiny_comfy

    from diffinstruct.comfyui import training as comfy_train
    from diffinstruct.comfyui.files import save_weights

    mappings = declarations(host)
    with torch.inference_mode():  # as ComfyUI runs nodes
        model, clip, vae = tiny_comfy.tiny_model(), tiny_comfy.tiny_clip(), tiny_comfy.tiny_vae()
        original = {k: v.clone() for k, v in model.model.state_dict().items()}
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "")[0]
        long_prompt = "a very long prompt about a cat " * 20  # > 77 tokens: two CLIP windows
        out = mappings["DIPPAlign"]().align(model, clip, vae, f"a cat\na dog\n{long_prompt}", reward, 1000.0, 1.5, 3,
                                            width=SIZE, height=SIZE, learning_rate=1e-2, batch_size=3,
                                            checkpoint_dir=str(host.tmp / "match"))["result"]
        path = save_weights(out[1], host.tmp / "loras", "match/lora")
        loaded = mappings["LoraLoader"]().load_lora(model, clip, f"match/{path.name}", 1.0, 1.0)[0]
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        a = comfy_train.one_step_sample(out[0], cond, 0, 2, SIZE, SIZE)
        b = comfy_train.one_step_sample(loaded, cond, 0, 2, SIZE, SIZE)
        base = comfy_train.one_step_sample(model, cond, 0, 2, SIZE, SIZE)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - base).abs().max() > 1e-3  # the LoRA does change the model
    for key, value in model.model.state_dict().items():  # the shared MODEL is untouched by training
        assert torch.equal(value, original[key]), key


def test_composed_workflow_runs(host):
    overrides = {"DIPPTrain": {"steps": 4, "width": SIZE, "height": SIZE, "checkpoint_dir": str(host.tmp / "composed"),
                               "checkpoint_every": 2},
                 "DIPPOneStepSample": {"width": SIZE, "height": SIZE}}
    executor, server = run(host, workflow("composed_pipeline", overrides))
    assert not errors(server), errors(server)
    outputs = executor.history_result["outputs"]
    images = [o["images"] for o in outputs.values() if "images" in o]
    assert len(images) == 2  # samples and curves previews
    assert (host.tmp / "composed" / "latest").read_text().strip() == "step-000004"


def test_cancel_stops_within_a_step_and_the_run_resumes(host):
    folder = host.tmp / "cancelled"
    prompt = workflow("align_one_click", align_overrides(folder, steps=6, checkpoint_every=100))
    host.interrupt_at = 2
    try:
        _, server = run(host, prompt)
    finally:
        host.interrupt_at = None
    assert [e for e, _ in server.messages if e == "execution_interrupted"], server.messages[-3:]
    assert (folder / "latest").read_text().strip() == "step-000002"  # the completed steps were checkpointed
    from diffinstruct import checkpoint

    assert checkpoint.incomplete_reason(folder / "step-000002", verify=True) is None
    # re-queueing the same prompt resumes from the checkpoint
    executor, server = run(host, prompt)
    assert not errors(server), errors(server)
    assert (folder / "latest").read_text().strip() == "step-000006"
    align_id = next(k for k, v in prompt.items() if v["class_type"] == "DIPPAlign")
    assert [v for v, _, node in host.progress if node == align_id][0] == 2
    # and once more on the same executor: the training node runs again instead of returning its cached result
    executor, server = run(host, prompt, executor)
    assert not errors(server), errors(server)
    cached = [d["nodes"] for e, d in server.messages if e == "execution_cached"][0]
    assert align_id not in cached and "1" in cached  # the checkpoint loader is cached, Align is not
    assert [v for v, _, node in host.progress if node == align_id] == [6]  # nothing left to train: resumed at 6


def test_cancel_with_the_default_folder_says_where_and_requeueing_resumes(host, caplog):
    """checkpoint_dir empty (the shipped default): Cancel leaves a checkpoint in a folder named after the run, the
    node's status and the log name it, and queueing the same workflow again resumes there."""
    prompt = workflow("align_one_click", align_overrides(host.tmp, steps=6, checkpoint_every=100))
    align_id = next(k for k, v in prompt.items() if v["class_type"] == "DIPPAlign")
    prompt[align_id]["inputs"]["checkpoint_dir"] = ""
    runs = Path(host.folder_paths.get_output_directory()) / "diffinstruct_runs"
    host.interrupt_at = 3
    try:
        with caplog.at_level("WARNING", logger="diffinstruct"):
            _, server = run(host, prompt)
    finally:
        host.interrupt_at = None
    assert [e for e, _ in server.messages if e == "execution_interrupted"]
    (folder,) = [p for p in runs.iterdir() if p.name.startswith("align-")]
    assert (folder / "latest").read_text().strip() == "step-000003"
    said = [d["lines"] for e, d in host.status.messages if e == "diffinstruct.progress" and d["node"] == align_id]
    assert said[-1] == [f"stopped after 3 steps: checkpoint {folder / 'step-000003'}",
                        "queue the same workflow again to resume from it"]
    assert str(folder / "step-000003") in caplog.text
    prompt[align_id]["inputs"]["steps"] = 7  # more steps continue the same run
    executor, server = run(host, prompt)
    assert not errors(server), errors(server)
    assert [p for p in runs.iterdir() if p.name.startswith("align-")] == [folder]
    assert [v for v, _, node in host.progress if node == align_id][0] == 3  # resumed at step 3
    assert (folder / "latest").read_text().strip() == "step-000007"
    assert "(resumed at 3)" in executor.history_result["outputs"][align_id]["text"][0]


def test_bad_input_reaches_the_ui_as_an_error(host):
    prompt = workflow("align_one_click", align_overrides(host.tmp / "bad"))
    align = next(v for v in prompt.values() if v["class_type"] == "DIPPAlign")
    align["inputs"]["prompts"] = "\n  \n"
    _, server = run(host, prompt)
    errs = errors(server)
    assert errs and "prompt list is empty" in errs[0]["exception_message"]
    assert not (host.tmp / "bad").exists()


def test_unsupported_model_type_is_named(host):
    import comfy.model_sampling
    import tiny_comfy

    from diffinstruct.comfyui.host import model_family
    from diffinstruct.errors import UnsupportedModel

    model = tiny_comfy.tiny_model()

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.IMG_TO_IMG):
        pass

    # an image-to-image model: a BaseModel's interface with an IMG_TO_IMG parameterisation
    weird = SimpleNamespace(model=SimpleNamespace(apply_model=model.model.apply_model,
                                                  latent_format=model.model.latent_format,
                                                  model_sampling=Sampling(model.model.model_config)))
    with pytest.raises(UnsupportedModel, match="SD1.5 and SDXL"):
        model_family(weird)
    assert model_family(model)[0] == "ve"
    # the kinds users load by mistake, each named: an audio latent, a video latent, an inpainting variant
    for dims, what in ((1, "an audio"), (3, "a video or 3-D")):
        latent = SimpleNamespace(latent_dimensions=dims)
        other = SimpleNamespace(model=SimpleNamespace(**{**vars(weird.model), "latent_format": latent,
                                                         "model_sampling": model.model.model_sampling}))
        with pytest.raises(UnsupportedModel, match=f"is {what}.*text-to-image generators only; supported: SD1.5"):
            model_family(other)
    inpaint = tiny_comfy.tiny_model(5)
    inpaint.model.set_inpaint()
    with pytest.raises(UnsupportedModel, match=r"inpainting or edit variant \(it also takes mask, masked_image\)"):
        model_family(inpaint)


@pytest.mark.parametrize("model_type", ["V_PREDICTION", "FLOW"])
def test_v_prediction_and_flow_models_align(host, model_type):
    """v-prediction (VE family) and rectified-flow (CONST, as SD3 / Flux) models through the denoiser adapter."""
    tmp_path = run_dir(host, "vpred")  # inside ComfyUI's output folder, where the nodes may write
    import tiny_comfy

    from diffinstruct.comfyui import training as comfy_train
    from diffinstruct.comfyui.host import model_family

    mappings = declarations(host)
    with torch.inference_mode():
        model, clip, vae = tiny_comfy.tiny_model(0, model_type), tiny_comfy.tiny_clip(), tiny_comfy.tiny_vae()
        assert model_family(model)[0] == ("flow" if model_type == "FLOW" else "ve")
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "")[0]
        out = mappings["DIPPAlign"]().align(model, clip, vae, "a cat\na dog", reward, 1000.0, 2.0, 3, width=SIZE,
                                            height=SIZE, learning_rate=1e-2,
                                            checkpoint_dir=str(tmp_path / "run"))["result"]
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        a = comfy_train.one_step_sample(out[0], cond, 0, 2, SIZE, SIZE)
        base = comfy_train.one_step_sample(model, cond, 0, 2, SIZE, SIZE)
    summary = json.loads(out[4])
    assert summary["process"] == ("flow" if model_type == "FLOW" else "ve")
    assert torch.isfinite(a).all() and (a - base).abs().max() > 1e-4
    if model_type == "FLOW":
        assert float(out[0].model_options["diffinstruct"]["sigma_init"]) < 1.0  # flow sigma lives in (0, 1)


def test_sdxl_composed_nodes_on_conditioning(host):
    """SDXL's extra model input (y: pooled text + size embeddings) through the adapter; Train without prompts
    uses the reference score's positive conditioning."""
    tmp_path = run_dir(host, "sdxl")  # inside ComfyUI's output folder, where the nodes may write
    import tiny_comfy

    from diffinstruct.comfyui import training as comfy_train

    mappings = declarations(host)
    with torch.inference_mode():
        model, vae = tiny_comfy.tiny_sdxl_model(), tiny_comfy.tiny_vae()
        positive = tiny_comfy.sdxl_conditioning(1) + tiny_comfy.sdxl_conditioning(2)
        negative = tiny_comfy.sdxl_conditioning(3)
        ref = mappings["DIPPReferenceScore"]().build(model, positive, negative, 2.0)[0]
        ta = mappings["DIPPTAModel"]().build(model, "lora", 4, 1e-3)[0]
        reward = mappings["DIPPReward"]().build("saturation", 1.0, "")[0]
        loss = mappings["DIPPGeneratorLoss"]().build(ref, ta, 100.0, "DI++", "normalized", -2.0, 2.0, reward)[0]
        out = mappings["DIPPTrain"]().train(model, loss, vae, "", 3, 2, 1e-2, 0, SIZE, SIZE, str(tmp_path), 2,
                                            True)["result"]
        a = comfy_train.one_step_sample(out[0], positive, 0, 2, SIZE, SIZE)
        base = comfy_train.one_step_sample(model, positive, 0, 2, SIZE, SIZE)
    assert json.loads(out[4])["process"] == "ve" and out[1].metadata["diffinstruct.base_model"] == "SDXL (EPS)"
    assert torch.isfinite(a).all() and (a - base).abs().max() > 1e-4
    assert (tmp_path / "latest").read_text().strip() == "step-000003"


def test_full_weights_are_comfyui_diffusion_model_weights(host):
    """TA mode 'full': the saved weights are the diffusion model's own state dict (what Load Diffusion Model
    reads), and the aligned MODEL applies them as ComfyUI weight patches."""
    tmp_path = run_dir(host, "full")  # inside ComfyUI's output folder, where the nodes may write
    import tiny_comfy

    from diffinstruct.comfyui import training as comfy_train

    mappings = declarations(host)
    with torch.inference_mode():
        model, clip, vae = tiny_comfy.tiny_model(), tiny_comfy.tiny_clip(), tiny_comfy.tiny_vae()
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        ref = mappings["DIPPReferenceScore"]().build(model, cond, cond, 1.0)[0]
        ta = mappings["DIPPTAModel"]().build(model, "full", 4, 1e-4)[0]
        loss = mappings["DIPPGeneratorLoss"]().build(ref, ta, 0.0, "DI", "normalized", -2.0, 2.0, None)[0]
        out = mappings["DIPPTrain"]().train(model, loss, vae, "", 2, 1, 1e-3, 0, SIZE, SIZE, str(tmp_path), 2,
                                            True)["result"]
        weights = out[1]
        assert weights.kind == "full"
        assert set(weights.tensors) == set(model.model.diffusion_model.state_dict())
        fresh = tiny_comfy.tiny_model(seed=5)  # other random weights, replaced by the trained ones
        fresh.model.diffusion_model.load_state_dict(weights.tensors)
        a = comfy_train.one_step_sample(out[0], cond, 0, 2, SIZE, SIZE)
        b = comfy_train.one_step_sample(fresh, cond, 0, 2, SIZE, SIZE)
        base = comfy_train.one_step_sample(model, cond, 0, 2, SIZE, SIZE)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 1e-5
    path = mappings["DIPPSave"]().save(weights, "full/aligned")["result"][0]
    assert Path(path).parent.parent == host.tmp / "diffusion_models"


def test_a_composed_run_exported_from_the_graph_trains_under_torchrun_and_its_lora_loads(host, caplog):
    """Graph -> cluster: DI++ Export Run writes composed_pipeline's run (its Train replaced by the export), the CLI
    trains it with `torchrun --nproc_per_node 2` (CPU, gloo) importing this ComfyUI, and core Load LoRA applies the
    LoRA rank 0 saved, every key matched."""
    import logging
    import socket
    import subprocess

    import tiny_comfy

    from diffinstruct.comfyui import training as comfy_train

    prompt = {k: v for k, v in workflow("composed_pipeline", {}).items() if int(k) <= 9}
    # a V3 core node in the exported graph (FluxGuidance; SD1.5's conditioning ignores its guidance entry): the
    # cluster run calls it as ComfyUI's executor does
    prompt["16"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}}
    prompt["4"]["inputs"]["positive"] = ["16", 0]
    prompt["15"] = {"class_type": "DIPPExportRun", "inputs": {
        "model": ["1", 0], "loss": ["9", 0], "vae": ["1", 2], "clip": ["1", 1], "prompts": "a red car\na blue house",
        "steps": 4, "batch_size": 1, "learning_rate": 3e-3, "seed": 0, "width": SIZE, "height": SIZE,
        "checkpoint_every": 2, "filename_prefix": "diffinstruct/cluster_run", "ema_decay": 0.95}}
    executor, server = run(host, prompt)
    assert not errors(server), errors(server)
    shown = executor.history_result["outputs"]["15"]
    config = Path(shown["path"][0])
    assert json.loads(config.read_text())["graph"]["16"]["class_type"] == "FluxGuidance"
    assert any("torch.distributed.run" in line for line in shown["text"])
    out = host.tmp / "loras" / "cluster"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT / "python_shim"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "diffinstruct", "comfyui", "train", "--config", str(config),
           "--comfyui", COMFY, "--custom-node", str(HERE / "testing_nodes" / "dipp_test_nodes"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(host.tmp), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    saved = Path(summary["saved"])
    assert summary["world_size"] == 2 and summary["steps"] == 4 and saved.is_file()
    assert (out / "latest").read_text().strip() == "step-000004"
    lora_name = saved.relative_to(host.tmp / "loras").as_posix()
    assert lora_name in host.folder_paths.get_filename_list("loras")

    mappings = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        model, clip = tiny_comfy.tiny_model(0), tiny_comfy.tiny_clip(0)
        loaded, _ = mappings["LoraLoader"]().load_lora(model, clip, lora_name, 1.0, 1.0)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red car"))
        base = comfy_train.one_step_sample(model, cond, 0, 2, SIZE, SIZE)
        after = comfy_train.one_step_sample(loaded, cond, 0, 2, SIZE, SIZE)
    assert "lora key not loaded" not in caplog.text, caplog.text
    moved = float((after - base).abs().max())
    print(f"\ngraph -> torchrun x2 -> Load LoRA: {saved.name}, samples moved by {moved:.4f}")
    assert (after - base).abs().max() > 1e-4
