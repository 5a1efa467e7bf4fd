"""comfyui/paths: a node writes and reads only inside ComfyUI's folders (the real-host suite queues the same
cases through ComfyUI's HTTP API). `folder_paths` here is a stand-in with ComfyUI's functions and layout (ComfyUI
is not installed for `make test`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffinstruct.comfyui import paths as cp
from diffinstruct.comfyui import registry
from diffinstruct.comfyui.nodes import train as train_nodes
from diffinstruct.comfyui.specs import TrainedWeights
from diffinstruct.errors import PathNotAllowed, UsageError

PATH_INPUTS = {"folder", "checkpoint_dir", "weights_path", "weights_folder"}


def folder_paths(base: Path) -> SimpleNamespace:
    models = base / "models"
    table = {"loras": ([str(models / "loras")], {".safetensors"}),
             "diffusion_models": ([str(models / "unet"), str(models / "diffusion_models")], {".safetensors"}),
             "checkpoints": ([str(models / "checkpoints")], {".safetensors"})}
    for paths, _ in table.values():
        for p in paths:
            Path(p).mkdir(parents=True, exist_ok=True)
    (base / "output").mkdir(exist_ok=True)

    def add_model_folder_path(name, path, is_default=False):
        table.setdefault(name, ([], set()))[0].insert(0 if is_default else len(table[name][0]), path)

    return SimpleNamespace(models_dir=str(models), folder_names_and_paths=table,
                           get_output_directory=lambda: str(base / "output"),
                           get_folder_paths=lambda name: list(table[name][0]),
                           add_model_folder_path=add_model_folder_path)


@pytest.fixture
def fp(tmp_path, monkeypatch):
    monkeypatch.delenv(cp.ALLOW_ENV, raising=False)
    f = folder_paths(tmp_path / "ComfyUI")
    cp.register_rewards_folder(f)
    return f


def test_writes_inside_the_output_and_model_folders(fp):
    out = Path(fp.get_output_directory())
    assert cp.confine_write("runs/align-1", "checkpoint_dir", fp) == Path(os.path.realpath(out / "runs/align-1"))
    assert cp.confine_write(str(out / "a" / "b"), "folder", fp).parent.name == "a"
    lora = Path(fp.get_folder_paths("loras")[0]) / "mine"
    assert cp.confine_write(str(lora), "folder", fp) == Path(os.path.realpath(lora))


@pytest.mark.parametrize("make", [
    lambda base, out: "/tmp/elsewhere",
    lambda base, out: str(out / ".." / ".." / "escape"),
    lambda base, out: "../../escape",
    lambda base, out: "~/diffinstruct-run",
    lambda base, out: str(base / "models" / "vae"),  # a model folder results do not belong in
])
def test_writes_elsewhere_are_refused_naming_the_input(fp, tmp_path, make):
    out = Path(fp.get_output_directory())
    with pytest.raises(PathNotAllowed, match=r"^checkpoint_dir .* is outside ComfyUI's folders") as info:
        cp.confine_write(make(tmp_path / "ComfyUI", out), "checkpoint_dir", fp)
    assert isinstance(info.value, UsageError) and isinstance(info.value, PermissionError)
    assert cp.ALLOW_ENV in str(info.value) and str(os.path.realpath(out)) in str(info.value)


def test_a_symlink_inside_pointing_outside_is_refused(fp, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Path(fp.get_output_directory()) / "link"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowed, match="resolves to"):
        cp.confine_write(str(link / "run"), "folder", fp)
    with pytest.raises(PathNotAllowed):
        cp.confine_write("link/run", "folder", fp)


def test_reads_come_from_the_registered_model_folders(fp, tmp_path):
    rewards = Path(fp.get_folder_paths("rewards")[0])
    assert rewards == Path(fp.models_dir) / "rewards"
    (rewards / "hpsv2").mkdir(parents=True)
    assert cp.confine_read("hpsv2", "weights_path", fp) == Path(os.path.realpath(rewards / "hpsv2"))
    for bad in ("/etc/passwd", str(Path(fp.get_output_directory()) / "x.pt"), "../../../etc/hostname"):
        with pytest.raises(PathNotAllowed, match=r"^weights_path "):
            cp.confine_read(bad, "weights_path", fp)


def test_extra_model_paths_extend_the_rewards_folder(fp, tmp_path):
    extra = tmp_path / "big-disk" / "rewards"
    extra.mkdir(parents=True)
    fp.add_model_folder_path("rewards", str(extra))
    assert cp.confine_read(str(extra / "imagereward"), "weights_path", fp).parent == Path(os.path.realpath(extra))
    cp.register_rewards_folder(fp)  # registering again keeps what extra_model_paths.yaml added
    assert str(extra) in fp.get_folder_paths("rewards")


def test_the_opt_in_allows_any_path(fp, monkeypatch):
    monkeypatch.setenv(cp.ALLOW_ENV, "1")
    assert cp.confine_write("/tmp/elsewhere", "folder", fp) == Path(os.path.realpath("/tmp/elsewhere"))
    monkeypatch.setenv(cp.ALLOW_ENV, "0")
    with pytest.raises(PathNotAllowed):
        cp.confine_write("/tmp/elsewhere", "folder", fp)


# ======================================================================= the nodes, inside a ComfyUI stand-in
@pytest.fixture
def inside(fp, monkeypatch):
    """The nodes as ComfyUI runs them: its folder_paths imported (here the stand-in above)."""
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def weights() -> TrainedWeights:
    return TrainedWeights("lora", {"diffusion_model.x.lora_up.weight": torch.zeros(2, 2)}, {}, True)


def tree(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def test_save_writes_only_inside_comfyuis_folders(inside, tmp_path):
    out, loras = Path(inside.get_output_directory()), Path(inside.get_folder_paths("loras")[0])
    save = registry.DEFINITIONS["DIPPSave"]
    assert save().save(weights(), "dipp/a")["result"][0].startswith(str(loras))  # empty: the loras folder
    assert save().save(weights(), "dipp/b", "mine")["result"][0].startswith(str(out / "mine"))  # relative: output
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "sub").mkdir()
    (out / "sub" / "esc").symlink_to(outside, target_is_directory=True)
    before = tree(tmp_path)
    for folder in ("/tmp/dipp-elsewhere", str(out / ".." / ".."), "link/deeper", str(Path.home())):
        said = save.VALIDATE_INPUTS("dipp/c", folder)
        assert isinstance(said, str) and said.startswith(f"folder {folder!r} is outside ComfyUI's folders"), said
        with pytest.raises(PathNotAllowed, match="^folder "):
            save().save(weights(), "dipp/c", folder)
    with pytest.raises(PathNotAllowed, match="^filename_prefix "):  # a link inside the prefix's folders
        save().save(weights(), "sub/esc/x", str(out))
    assert "must be a relative name" in save.VALIDATE_INPUTS("../up", "")
    assert tree(tmp_path) == before and not Path("/tmp/dipp-elsewhere").exists()


def test_training_nodes_refuse_a_checkpoint_dir_outside_at_queue_time(inside, tmp_path):
    out = Path(inside.get_output_directory())
    for kind in ("DIPPTrain", "DIPPAlign"):
        check = registry.DEFINITIONS[kind].VALIDATE_INPUTS
        assert check(checkpoint_dir="") is True and check(checkpoint_dir="runs/mine") is True
        for bad in ("/etc", str(tmp_path / "run"), "../../run", "~/run"):
            said = check(checkpoint_dir=bad)
            assert isinstance(said, str) and said.startswith(f"checkpoint_dir {bad!r} is outside"), said
    assert train_nodes.run_folder("align", "runs/mine", None, None) == os.path.realpath(out / "runs" / "mine")
    assert train_nodes.run_folder("align", "", None, None).startswith(str(out / "diffinstruct_runs" / "align-"))
    with pytest.raises(PathNotAllowed, match="^checkpoint_dir "):
        train_nodes.run_folder("train", str(tmp_path / "run"), None, None)
    assert not (tmp_path / "run").exists()


def test_reward_offers_the_rewards_folders_files_and_reads_only_there(inside, tmp_path):
    rewards = Path(inside.get_folder_paths("rewards")[0])
    (rewards / "imagereward" / "tokenizer").mkdir(parents=True)
    (rewards / "imagereward" / "ImageReward.safetensors").write_bytes(b"")
    (rewards / "imagereward" / "tokenizer" / "vocab.txt").write_text("")
    (rewards / "mine.safetensors").write_bytes(b"")
    node = registry.DEFINITIONS["DIPPReward"]
    choices = node.INPUT_TYPES()["required"]["weights_path"][0]
    assert choices == [cp.AUTO, "imagereward", "imagereward/ImageReward.safetensors", "imagereward/tokenizer",
                       "mine.safetensors"]
    assert cp.reward_weights("mine.safetensors") == os.path.realpath(rewards / "mine.safetensors")
    assert cp.reward_weights(cp.AUTO) is None and cp.reward_weights("") is None
    assert node.VALIDATE_INPUTS("preference", "mine.safetensors") is True
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    for bad in ("/etc/passwd", str(tmp_path / "elsewhere.safetensors"), "../../../../etc/hostname"):
        said = node.VALIDATE_INPUTS("preference", bad)
        assert isinstance(said, str) and said.startswith("weights_path "), (bad, said)
        with pytest.raises(PathNotAllowed):
            node().build("preference", 1.0, bad)
    assert "in none of ComfyUI's rewards folders" in node.VALIDATE_INPUTS("preference", "absent.safetensors")
    assert "rewards/pickscore" in node.VALIDATE_INPUTS("pickscore", cp.AUTO)  # auto names where it looks


def test_tiny_demo_nodes_read_and_write_inside_only(inside, tmp_path):
    models = registry.DEFINITIONS["DIPPTinyDemoModels"]
    taste = registry.DEFINITIONS["DIPPTinyTasteReward"]
    assert models.VALIDATE_INPUTS("") is True and taste.VALIDATE_INPUTS("") is True
    assert models.VALIDATE_INPUTS(str(Path(inside.get_folder_paths("diffusion_models")[0]) / "tiny")) is True
    assert taste.VALIDATE_INPUTS("taste") is True
    for bad in ("/etc", str(tmp_path)):
        assert models.VALIDATE_INPUTS(bad).startswith("weights_folder ")
        assert taste.VALIDATE_INPUTS(bad).startswith("folder ")
    with pytest.raises(PathNotAllowed):
        models().load("/etc")


def test_outside_comfyui_the_nodes_take_any_path(tmp_path, monkeypatch):
    """Called as plain functions (no folder_paths imported: the tests without ComfyUI, scripts), the nodes run with
    their caller's rights, as the CLI does."""
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert cp.node_write(str(tmp_path / "x"), "folder") == tmp_path / "x"
    assert cp.reward_weights(str(tmp_path / "w.pt")) == str(tmp_path / "w.pt")
    assert cp.reward_choices() == [cp.AUTO]


def test_every_path_input_of_every_node_is_checked_when_queued():
    """A node that takes a path checks it in VALIDATE_INPUTS (ComfyUI passes exactly the named arguments)."""
    import inspect

    checked = {}
    for node_id, cls in registry.DEFINITIONS.items():
        spec = cls.INPUT_TYPES()
        names = {n for part in ("required", "optional") for n in spec.get(part, {})} & PATH_INPUTS
        if names:
            args = set(inspect.signature(cls.VALIDATE_INPUTS).parameters)
            assert names <= args, (node_id, names - args)
            checked[node_id] = names
    assert set(checked) == {"DIPPTrain", "DIPPAlign", "DIPPSave", "DIPPReward", "DIPPTinyDemoModels",
                            "DIPPTinyTasteReward"}, checked
