"""The pack in a real ComfyUI server on loopback: the Templates route lists and serves every shipped workflow and
its thumbnail on both install routes, and nothing else (no API twins)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "main.py").is_file():
    pytest.skip("real-ComfyUI server tests skipped: set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)

from comfy_server import ROOT, comfy_server  # noqa: E402

TEMPLATES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
WHEEL = os.environ.get("DIPP_WHEEL", "")  # a built wheel (make wheel): also test the route with it installed


def installed_wheel(tmp_path: Path) -> Path:
    if not WHEEL:
        pytest.skip("set DIPP_WHEEL to a built wheel to test the wheel route with the real wheel")
    import subprocess
    import sys

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), WHEEL],
                   check=True)
    return target


@pytest.mark.parametrize("route", ["clone", "wheel", "built wheel"])
def test_templates_are_listed_and_served_with_thumbnails(route, tmp_path):
    python = installed_wheel(tmp_path) if route == "built wheel" else None
    with comfy_server(COMFY, tmp_path / "comfy", "wheel" if python else route, python) as server:
        listing = server.get_json("/api/workflow_templates")
        assert {k: sorted(v) for k, v in listing.items()} == {server.module: TEMPLATES}, listing
        for name in TEMPLATES:
            status, _, body = server.get(f"/api/workflow_templates/{server.module}/{name}.json")
            assert status == 200, (name, status)
            assert json.loads(body) == json.loads((ROOT / "workflows" / f"{name}.json").read_text())
            status, kind, body = server.get(f"/api/workflow_templates/{server.module}/{name}.jpg")
            assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8", (name, status, kind)
        extensions = server.get_json("/extensions")
        assert any(e.endswith("/diffinstruct.js") for e in extensions), extensions
        nodes = server.get_json("/object_info")
        assert len([k for k in nodes if k.startswith("DIPP")]) == 14
        assert "installed twice" not in server.log_text()
