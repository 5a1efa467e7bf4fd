"""The suite and the ComfyUI entry point work whatever the checkout folder is called.

Users clone into folders such as `ComfyUI-DiffInstruct` or unpack `diffinstruct-main`: names that are not
Python identifiers, or that equal the package's own name. A copy of the checkout under each such name runs a
few tests from several files (fixtures, helper modules, paths relative to the files), collects the whole suite
with pytest started at the copy's root, and loads the root `__init__.py` the way ComfyUI does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER_NAMES = ["diffinstruct", "ComfyUI-DiffInstruct", "diff-instruct.v2"]
# cheap tests from files that use conftest fixtures, the helper modules beside the tests and repository paths
SAMPLE_TESTS = [
    "tests/test_build_flags.py",
    "tests/ops/test_cfg_combine.py::test_cfg_combine",
    "tests/test_nodes.py::test_pack_imports_without_comfy",
    "tests/test_tiny_problem.py::test_shipped_weights_match_their_manifest",
]


SKIPPED_DIRS = {"build", "dist", "runs", "__pycache__"}  # build and run outputs, never part of a checkout
SKIPPED_SUFFIXES = (".so", ".pyc", ".o")


def _checkout_files() -> list[str]:
    """The files a clone holds: git's tracked and not-ignored files (uncommitted work included); in a downloaded
    archive without .git, every file but hidden folders (.venv, .git) and build or run outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode == 0:
        return [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in rel.parts[:-1]):
            continue
        if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES):
            files.append(str(rel))
    return files


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = _checkout_files()
    made = {}
    for name in FOLDER_NAMES:
        dest = tmp_path_factory.mktemp("clone") / name
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
        made[name] = dest
    return made


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_sample_tests_pass_in_a_copy_named(copies: dict[str, Path], name: str) -> None:
    run = _pytest(copies[name], *SAMPLE_TESTS)
    assert run.returncode == 0, f"in a checkout named {name!r}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    passed = int(run.stdout.rsplit(" passed", 1)[0].split()[-1])
    assert passed >= len(SAMPLE_TESTS), run.stdout[-2000:]


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_whole_suite_collects_from_the_copy_root(copies: dict[str, Path], name: str) -> None:
    """`pytest` at the root (what a user types first) and `pytest tests` (what make test runs) both collect."""
    for args in ((), ("tests",)):
        run = _pytest(copies[name], "--collect-only", *args)
        assert run.returncode == 0, f"{name!r}, pytest {' '.join(args)}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
        assert " error" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
        collected = int(run.stdout.rsplit(" tests collected", 1)[0].split()[-1])
        assert collected > 500, run.stdout[-1000:]


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_comfyui_loads_the_entry_point_of_a_copy_named(copies: dict[str, Path], name: str) -> None:
    """ComfyUI imports custom_nodes/<folder>/__init__.py as a package named by the folder's path with dots
    replaced by `_x_` (dashes kept), so even a folder called `diffinstruct` does not shadow the package."""
    init = copies[name] / "__init__.py"
    module = str(copies[name]).replace(".", "_x_")
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location({module!r}, {str(init)!r});"
            f"m = importlib.util.module_from_spec(spec); sys.modules[{module!r}] = m; spec.loader.exec_module(m);"
            "print(len(m.NODE_CLASS_MAPPINGS))")
    run = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == 14
