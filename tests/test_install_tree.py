"""`pip install .` / `pip wheel .` in a clean checkout (ComfyUI/custom_nodes/ComfyUI-DiffInstruct) leave the
checkout as it was: setup.py builds in a temporary folder (no build/, no *.egg-info), and the wheel still holds
the compiled extension and the package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def copy_checkout(dest: Path) -> None:
    """The tracked files as they are in the working tree (links stay links: nodes/, comfyui/workflows)."""
    for name in tracked_files():
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_pip_wheel_leaves_the_checkout_untouched(tmp_path: Path) -> None:
    pack = tmp_path / "ComfyUI-DiffInstruct"
    copy_checkout(pack)
    before = tree(pack)
    scratch = tmp_path / "tmp"  # setup.py's temporary build folder goes here, and must be gone afterwards
    scratch.mkdir()
    env = dict(os.environ, DIPP_CUDA="off", TMPDIR=str(scratch), PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheels = tmp_path / "whl"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-q",
                             "-w", str(wheels)], cwd=pack, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    (wheel,) = wheels.glob("diffinstruct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("diffinstruct/_core") and n.endswith(".so") for n in names), sorted(names)
    assert "diffinstruct/comfyui/web/diffinstruct.js" in names
    assert any(n.startswith("diffinstruct/comfyui/workflows/") and n.endswith(".json") for n in names)
    assert any(n.startswith("diffinstruct/tiny/weights/") for n in names)
    assert "diffinstruct/libdipp_cuda.so" not in names  # DIPP_CUDA=off

    after = tree(pack)
    # the topmost of what appeared or vanished (build/, python_shim/diffinstruct.egg-info/, ...), not their contents
    appeared = sorted(p for p in after - before if str(Path(p).parent) not in after - before)
    vanished = sorted(p for p in before - after if str(Path(p).parent) not in before - after)
    assert not appeared and not vanished, f"pip wheel changed the checkout: new {appeared}, gone {vanished}"
    assert not list(scratch.glob("diffinstruct-build-*")), "setup.py left its temporary build folder"
