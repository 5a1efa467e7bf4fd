"""comfyui/paths: a node writes and reads only inside ComfyUI's folders (the real-host suite queues the same
cases through ComfyUI's HTTP API). `folder_paths` here is a stand-in with ComfyUI's functions and layout (ComfyUI
is not installed for `make test`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffinstruct.comfyui import paths as cp
from diffinstruct.errors import PathNotAllowed, UsageError


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
