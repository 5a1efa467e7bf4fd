"""A real ComfyUI server on loopback, the pack installed by cloning: workflows queued through its HTTP API
(POST /prompt, as anyone who reaches a server started with --listen can) with paths outside ComfyUI's folders
(absolute, '..', a link inside the output folder pointing outside, a system file) are refused when queued, on the
node that holds the path, and nothing is written or read outside; a workflow with paths inside runs and writes
there; with DIFFINSTRUCT_ALLOW_ANY_PATH=1 (the opt-in) a path outside is accepted."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "main.py").is_file():
    pytest.skip("real-ComfyUI server tests skipped: set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)

from comfy_server import comfy_server  # noqa: E402

RUN_TIMEOUT_S = 300
REFUSED = "is outside ComfyUI's folders"
ALIGN = {"prompts": "a large red circle at the top left", "alpha": 1.0, "omega": 1.0, "steps": 2,
         "negative_prompt": "", "rank": 2, "ta_learning_rate": 1e-4, "batch_size": 1, "learning_rate": 1e-4,
         "seed": 0, "width": 16, "height": 16,
         "checkpoint_dir": "runs/ok", "checkpoint_every": 50, "preview_every": 0, "diversity_warning": 0.0}
# the tiny demo's models (no files needed), a reward, Align, Save; each case below changes one path in it
GRAPH = {
    "1": {"class_type": "DIPPTinyDemoModels", "inputs": {"weights_folder": ""}},
    "2": {"class_type": "DIPPReward", "inputs": {"reward": "brightness", "weight": 1.0, "weights_path": "auto"}},
    "3": {"class_type": "DIPPAlign", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                "reward": ["2", 0], **ALIGN}},
    "4": {"class_type": "DIPPSave", "inputs": {"weights": ["3", 1], "filename_prefix": "dipp/ok", "folder": "mine"}},
}
TASTE = {"5": {"class_type": "DIPPTinyTasteReward", "inputs": {"images": 8, "pairs": 16, "epochs": 1, "seed": 0,
                                                               "folder": "taste"}}}


SYSTEM = (Path("/etc/passwd"), Path("/etc/hostname"))


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with its size and modification time (links not followed), and the system files'."""
    seen = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in SYSTEM if p.exists()}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(folder, name))
                seen[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    comfy = base / "comfy"
    (comfy / "output").mkdir(parents=True)
    (comfy / "models" / "rewards").mkdir(parents=True)
    (comfy / "models" / "rewards" / "mine.safetensors").write_bytes(b"")
    outside = base / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "teacher.safetensors").write_bytes(b"not yours")
    for folder in (comfy / "output", comfy / "models" / "rewards"):  # links inside, pointing out
        (folder / "escape").symlink_to(outside, target_is_directory=True)
    with comfy_server(COMFY, comfy, "clone") as running:
        running.outside = outside
        yield running


def queue(server, graph: dict) -> tuple[int, dict]:
    status, body = server.post_json("/prompt", {"prompt": graph, "client_id": "paths-test"})
    return status, body


def bad_paths(server) -> dict[str, str]:
    out = server.base / "output"
    return {"absolute": str(server.outside / "run"), "dotdot": str(out / ".." / ".." / "outside" / "run"),
            "relative dotdot": "../../outside/run", "link": "escape/run", "system": "/etc/passwd",
            "home": "~/diffinstruct-run"}


CASES = [("3", "checkpoint_dir"), ("4", "folder"), ("1", "weights_folder"), ("2", "weights_path"), ("5", "folder")]


@pytest.mark.parametrize(("node", "name"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_paths_outside_are_refused_when_queued_and_nothing_outside_changes(server, node, name):
    """ComfyUI queues the outputs a refusal does not touch (Align, when only Save's folder is refused) and reports
    the refusal in node_errors; the refused node never runs."""
    before = snapshot(server.outside)
    for kind, path in bad_paths(server).items():
        graph = copy.deepcopy(TASTE if node in TASTE else GRAPH)
        graph[node]["inputs"][name] = path
        if name == "weights_path":
            graph[node]["inputs"]["reward"] = "preference"
        status, body = queue(server, graph)
        errors = body.get("node_errors", {})
        assert set(errors) == {node}, (kind, status, body)
        said = " ".join(e["details"] for e in errors[node]["errors"])
        assert f"{name} {path!r} {REFUSED}" in said, (kind, said)
        assert "DIFFINSTRUCT_ALLOW_ANY_PATH" in said
        if status == 200:  # the other outputs run; the refused node is not among what ran
            assert node == "4", (kind, body)
            done = wait_done(server, body["prompt_id"])
            assert done["status"]["status_str"] == "success" and node not in done["outputs"], done
        else:
            assert status == 400, (kind, status, body)
    assert snapshot(server.outside) == before
    assert not (Path.home() / "diffinstruct-run").exists()


def test_the_reward_lists_the_rewards_folder_and_a_listed_file_validates(server):
    info = server.get_json("/object_info/DIPPReward")["DIPPReward"]
    options = info["input"]["required"]["weights_path"]
    choices = options[1]["options"] if isinstance(options[0], str) else options[0]
    assert choices == ["auto", "mine.safetensors"], options
    graph = copy.deepcopy(GRAPH)
    graph["2"]["inputs"].update(reward="preference", weights_path="mine.safetensors")
    graph["3"]["inputs"]["steps"] = 0  # invalid on purpose: the prompt must not run, the Reward must pass
    status, body = queue(server, graph)
    assert status == 400 and set(body["node_errors"]) == {"3"}, body


def wait_done(server, prompt_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(1.0)
    raise TimeoutError(f"the prompt did not finish in {RUN_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")


def test_paths_inside_are_accepted_and_written_there(server):
    before = snapshot(server.outside)
    status, body = queue(server, GRAPH)
    assert status == 200, body
    done = wait_done(server, body["prompt_id"])
    assert done["status"]["status_str"] == "success", done["status"]
    out = server.base / "output"
    saved = list((out / "mine" / "dipp").glob("ok_*.safetensors"))
    assert len(saved) == 1 and (out / "runs" / "ok" / "latest").is_file()
    assert snapshot(server.outside) == before


def test_the_opt_in_lets_a_path_outside_through(tmp_path):
    outside = tmp_path / "elsewhere"
    graph = copy.deepcopy(GRAPH)
    graph["3"]["inputs"]["checkpoint_dir"] = str(outside / "run")
    graph["4"]["inputs"]["folder"] = str(outside / "loras")
    with comfy_server(COMFY, tmp_path / "comfy", "clone", env={"DIFFINSTRUCT_ALLOW_ANY_PATH": "1"}) as server:
        status, body = queue(server, graph)
        assert status == 200, body
        done = wait_done(server, body["prompt_id"])
    assert done["status"]["status_str"] == "success", done["status"]
    assert (outside / "run" / "latest").is_file() and len(list((outside / "loras" / "dipp").glob("*.safetensors"))) == 1
