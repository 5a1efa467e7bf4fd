"""The CUDA kernels are compiled by the build (when nvcc exists), export every kernel,
load lazily without a GPU, and the wheel builds with and without them."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffinstruct

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(diffinstruct.__file__).parent
HAVE_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not installed: the CUDA library is not built here")


def kernel_names() -> list[str]:
    header = (ROOT / "csrc" / "dipp.h").read_text()
    block = header[header.index("#define DIPP_KERNELS(X)"):header.index("#define DIPP_DECLARE_CPU")]
    return re.findall(r"X\((\w+),", block)


def test_kernel_list_is_complete():
    assert kernel_names() == ["fill_uniform", "fill_normal", "sample_sigma", "add_noise", "cfg_combine", "ta_loss",
                              "generator_grad", "huber_terms", "ema_update", "adam_step"]


@needs_nvcc
def test_cuda_library_was_built_from_current_sources():
    lib = PACKAGE / "libdipp_cuda.so"
    assert lib.exists(), "the build should have compiled cuda/*.cu into libdipp_cuda.so"
    newest = max(p.stat().st_mtime for p in [*ROOT.glob("cuda/*.cu"), *ROOT.glob("cuda/*.cuh"), *ROOT.glob("csrc/*.h")])
    assert lib.stat().st_mtime >= newest


@needs_nvcc
def test_cuda_library_exports_every_kernel_and_nothing_else():
    out = subprocess.run(["nm", "-D", "--defined-only", str(PACKAGE / "libdipp_cuda.so")], capture_output=True,
                         text=True, check=True).stdout
    exported = sorted(set(re.findall(r"\bdipp_cuda_\w+", out)))
    assert exported == sorted([*(f"dipp_cuda_{name}" for name in kernel_names()), "dipp_cuda_device_check"])


def default_archs() -> tuple[str, ...]:
    """setup.py's DEFAULT_CUDA_ARCHS, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets)]
    return ast.literal_eval(value)


def test_default_architectures_are_turing_to_blackwell():
    assert default_archs() == ("75", "80", "86", "89", "90", "120")


@needs_nvcc
def test_cuda_library_targets_turing_to_blackwell_plus_ptx():
    # the embedded cubins name their targets (cuobjdump is not installed here)
    if os.environ.get("DIPP_CUDA_ARCHS"):
        pytest.skip("DIPP_CUDA_ARCHS chose the architectures of this build")
    data = (PACKAGE / "libdipp_cuda.so").read_bytes()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    supported = set(re.findall(r"compute_(\d+)", listed))
    archs = [a for a in default_archs() if a in supported]
    assert {"80", "90"} <= set(archs)  # any CUDA 12/13 nvcc builds these
    for arch in archs:
        assert re.search(rb"sm_%s(?!\d)" % arch.encode(), data), f"no sm_{arch} image"
    assert re.search(rb"compute_%s(?!\d)" % archs[-1].encode(), data), "no PTX for GPUs newer than the list"


@needs_nvcc
def test_cuda_library_loads_lazily_and_is_refused_without_a_gpu():
    """Not loaded at import; loaded on demand, and kept only when it can run here (its device check)."""
    code = ("import torch; from diffinstruct import _core; "
            "before = _core.cuda_status(); after = _core.cuda_status(load=True); "
            "print(before[0], after[0], torch.cuda.is_available()); print(after[2])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    flags, reason = out.split("\n", 1)
    before, after, gpu = flags.split()
    assert before == "False"
    if gpu == "True":
        assert after == "True", reason
    else:  # the static CUDA runtime finds no device: a reason naming it, not a library that fails later
        assert after == "False" and "cannot run here" in reason and "device" in reason, reason


def test_missing_cuda_library_gives_a_reason(tmp_path):
    env = dict(os.environ, DIPP_CUDA_LIBRARY=str(tmp_path / "absent.so"))
    code = "from diffinstruct import _core; print(_core.cuda_status(load=True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "False" in out and "absent.so" in out and "nvcc" in out


def test_importing_needs_no_cuda():
    """Import and a CPU kernel call work with no visible GPU, and never load the CUDA library."""
    code = ("import numpy as np; from diffinstruct import _core, kernels; "
            "x = np.zeros(4, np.float32); kernels.fill_normal(x, 1); assert x.any(); "
            "assert _core.cuda_status()[0] is False; print('ok')")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def build_wheel(tmp_path: Path, cuda: str) -> Path:
    out = tmp_path / f"wheel-cuda{cuda}"
    env = dict(os.environ, DIPP_CUDA=cuda)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, env=env, cwd=ROOT)
    (wheel,) = out.glob("diffinstruct-*.whl")
    return wheel


def check_wheel_runs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import numpy as np, diffinstruct; from diffinstruct import kernels; "
            "assert diffinstruct.__file__.startswith(%r), diffinstruct.__file__; "
            "x = np.zeros(8, np.float32); kernels.fill_normal(x, 1); assert np.abs(x).sum() > 0; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code % str(target)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_wheel_without_cuda(tmp_path):
    wheel = build_wheel(tmp_path, "0")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("diffinstruct/_core") and n.endswith(".so") for n in names)
    assert "diffinstruct/libdipp_cuda.so" not in names
    check_wheel_runs(wheel, tmp_path)


@pytest.mark.slow
@needs_nvcc
def test_wheel_with_cuda(tmp_path):
    wheel = build_wheel(tmp_path, "1")
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffinstruct/libdipp_cuda.so" in names
    check_wheel_runs(wheel, tmp_path)


VENV = Path(sys.prefix)


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / ".deps-installed").exists() or shutil.which("make") is None,
                    reason="make wheel runs in the Makefile's virtual environment (make build creates it)")
def test_make_wheel_is_a_repaired_manylinux_wheel(tmp_path):
    """PyPI refuses linux_x86_64 wheels: `make wheel` must leave exactly one manylinux wheel, with the
    non-manylinux libraries (libgomp) vendored and found through the extension's RPATH."""
    dist = tmp_path / "dist"
    subprocess.run(["make", "-C", str(ROOT), "wheel", f"DIST={dist}", f"VENV={VENV}"], check=True,
                   capture_output=True, text=True)
    wheels = sorted(p.name for p in dist.iterdir())
    assert len(wheels) == 1, wheels
    (wheel,) = dist.glob("diffinstruct-*.whl")
    assert re.fullmatch(r"diffinstruct-[\w.]+-cp\d+-cp\d+-manylinux_(\d+)_(\d+)_(x86_64|aarch64)\.whl", wheel.name), \
        wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tags = [line for line in zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode().splitlines()
                if line.startswith("Tag:")]
    assert tags and all("manylinux_" in t and "linux_x86_64" not in t.replace("manylinux", "") for t in tags), tags
    from diffinstruct import _core
    assert any(n.startswith("diffinstruct.libs/libgomp") for n in names) == bool(_core.OPENMP), names
    assert ("diffinstruct/libdipp_cuda.so" in names) == HAVE_NVCC
    check_wheel_runs(wheel, tmp_path)
