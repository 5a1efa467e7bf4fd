"""The pack's templates and both install routes without ComfyUI: which folder ComfyUI would serve, thumbnails,
layout under the menu bar, the wheel's loader folder (templates, web extension), and installing twice.

The real server's Templates route is exercised in tests/comfy_host/test_comfy_server.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffinstruct import cli, comfyui
from diffinstruct.comfyui import thumbnails as comfy_thumbnails
from diffinstruct.errors import InstallError

ROOT = Path(__file__).resolve().parents[1]
# ComfyUI (app/custom_node_manager.py) serves a pack's templates from the first of these folders that exists
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
TEMPLATES = ["align_one_click", "composed_pipeline", "evaluate_before_after", "tiny_demo"]
MIN_TITLE_Y = 80  # canvas pixels at scale 1: the frontend's menu bar covers the top ~40


def load_module(name: str, init: Path):
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_comfyui_serves_workflows_and_lists_no_api_twins():
    present = [name for name in TEMPLATE_FOLDERS if (ROOT / name).is_dir()]
    assert present == ["workflows"], "another template folder would shadow workflows/"
    assert sorted(p.stem for p in (ROOT / "workflows").glob("*.json")) == TEMPLATES
    assert sorted(p.name for p in (ROOT / "workflows" / "api").glob("*.json")) == [f"{t}_api.json" for t in TEMPLATES]


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_has_a_thumbnail_of_its_graph(name):
    path = ROOT / "workflows" / f"{name}.jpg"
    with Image.open(path) as stored:
        assert stored.format == "JPEG" and stored.size == comfy_thumbnails.SIZE
        stored_rgb = stored.convert("RGB")
    fresh = comfy_thumbnails.render(json.loads((ROOT / "workflows" / f"{name}.json").read_text()))
    # the stored picture is the current graph's (JPEG and Pillow versions change pixels only slightly)
    diff = sum(abs(a - b) for a, b in zip(stored_rgb.tobytes(), fresh.tobytes(), strict=True)) / len(fresh.tobytes())
    assert diff < 3.0, f"{path.name} is stale: python -m diffinstruct.comfyui.thumbnails workflows/"


@pytest.mark.parametrize("name", TEMPLATES)
def test_no_node_title_opens_under_the_menu_bar(name):
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    ds = workflow["extra"]["ds"]
    assert ds["scale"] == 1 and ds["offset"] == [0, 0]
    top = min(n["pos"][1] for n in workflow["nodes"]) - comfy_thumbnails.TITLE_H
    assert top >= MIN_TITLE_Y, (name, top)


def test_wheel_route_ships_the_templates_and_the_web_extension():
    package = ROOT / "python_shim" / "diffinstruct" / "comfyui"
    assert comfyui.pack_folder() == package.resolve()
    assert (package / "workflows").resolve() == (ROOT / "workflows").resolve()  # the wheel's copy is the same folder
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"diffinstruct.comfyui" = ["web/*.js", "workflows/*.json", "workflows/*.jpg"]' in pyproject
    assert (package / "web" / "diffinstruct.js").is_file()
    # one import path on both routes: the clone's entry point only re-exports the package's ComfyUI side
    assert "from diffinstruct.comfyui.registry import exports" in (ROOT / "__init__.py").read_text()
    assert (ROOT / "nodes").resolve() == (package / "nodes").resolve()  # the design card's nodes/


def test_installer_writes_a_loader_folder_with_the_templates(tmp_path):
    (tmp_path / "main.py").write_text("")
    old = tmp_path / "custom_nodes" / "diffinstruct_loader.py"  # an earlier version's loader file is replaced
    old.parent.mkdir()
    old.write_text(comfyui.MARKER + "\n")
    folder = comfyui.install(tmp_path)
    assert folder == tmp_path / "custom_nodes" / "diffinstruct_loader" and not old.exists()
    shipped = sorted(p.name for p in (ROOT / "workflows").iterdir() if p.is_file())
    assert sorted(p.name for p in (folder / "workflows").iterdir()) == shipped
    for name in shipped:
        assert (folder / "workflows" / name).read_bytes() == (ROOT / "workflows" / name).read_bytes()
    (folder / "workflows" / "retired.json").write_text("{}")  # a template a newer wheel no longer ships
    (folder / "workflows" / "tiny_demo.json").write_text("{}")
    module = load_module("loader_under_test", folder / "__init__.py")
    assert len(module.NODE_CLASS_MAPPINGS) == 14
    assert Path(module.WEB_DIRECTORY, "diffinstruct.js").is_file()
    assert sorted(p.name for p in (folder / "workflows").iterdir()) == shipped  # refreshed on load
    assert (folder / "workflows" / "tiny_demo.json").read_bytes() == (ROOT / "workflows/tiny_demo.json").read_bytes()
    assert comfyui.install(tmp_path) == folder  # idempotent
    assert cli.main(["comfyui", "uninstall", "--comfyui", str(tmp_path)]) == 0 and not folder.exists()
    folder.mkdir()
    (folder / "__init__.py").write_text("# someone else's pack\n")
    with pytest.raises(InstallError, match="not written by this installer"):
        comfyui.install(tmp_path)
    assert cli.main(["comfyui", "install", "--comfyui", str(tmp_path / "nowhere")]) == 2


def test_installed_twice_the_clone_wins_and_both_paths_are_named(tmp_path, caplog):
    (tmp_path / "main.py").write_text("")
    folder = comfyui.install(tmp_path)
    clone = tmp_path / "custom_nodes" / "ComfyUI-DiffInstruct"
    clone.mkdir()
    (clone / "__init__.py").write_text((ROOT / "__init__.py").read_text())
    with caplog.at_level(logging.WARNING, logger="diffinstruct"):
        module = load_module("loader_beside_a_clone", folder / "__init__.py")
    assert module.NODE_CLASS_MAPPINGS == {}
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "installed twice" in message and str(clone) in message and str(folder) in message
    (clone.parent / (clone.name + ".disabled")).mkdir()
    clone.rename(clone.parent / "off")  # a disabled clone does not count
    (clone.parent / "off" / "__init__.py").rename(clone.parent / (clone.name + ".disabled") / "__init__.py")
    assert len(load_module("loader_alone", folder / "__init__.py").NODE_CLASS_MAPPINGS) == 14


def test_an_older_comfyui_gets_one_clear_message():
    """Inside a ComfyUI without comfy_api v0_0_2 (this venv has none), loading the pack fails with the version it
    needs; ComfyUI prints that in its log and lists the pack under its import failures."""
    init = str(ROOT / "__init__.py")
    code = ("import importlib.util, sys, types; sys.modules['folder_paths'] = types.ModuleType('folder_paths');"
            "v = types.ModuleType('comfyui_version'); v.__version__ = '0.3.40'; sys.modules['comfyui_version'] = v;"
            f"spec = importlib.util.spec_from_file_location('pack', {init!r}, submodule_search_locations=[]);"
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0
    assert "ImportError: diffinstruct needs ComfyUI >= 0.3.64" in result.stderr and "0.3.40" in result.stderr


def test_version_rule():
    from diffinstruct.comfyui import version as comfy_version

    assert comfy_version.parse_version("0.3.64") == (0, 3, 64) == comfy_version.MIN_COMFYUI
    assert comfy_version.parse_version("v0.3.100-rc1") == (0, 3, 100) and comfy_version.parse_version("dev") is None
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-comfyui = ">=0.3.64"' in pyproject
    assert "ComfyUI >= 0.3.64" in (ROOT / "README.md").read_text()
