"""The C sources compile warning-free under -Wall -Wextra, and DIPP_CUDA=1 refuses a build without nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("csrc/*.c")) + sorted(ROOT.glob("python_shim/*.c"))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_compiles_without_warnings(source):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-fopenmp", "-fsyntax-only",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'python_shim'}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{np.get_include()}", str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dipp_cuda_1_without_nvcc_is_an_error(tmp_path):
    env = dict(os.environ, DIPP_CUDA="1", NVCC=str(tmp_path / "no-nvcc-here"))
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                             "--build-temp", str(tmp_path / "temp")], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "DIPP_CUDA=1 but nvcc was not found" in result.stderr
