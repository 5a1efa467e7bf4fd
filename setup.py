"""Builds diffinstruct: the C extension (CPU kernels + binding) and, when nvcc
is found, the CUDA kernel library that the extension loads lazily.

Environment:
  DIPP_CUDA=1      require the CUDA library (fail without nvcc)
  DIPP_CUDA=0      skip CUDA even when nvcc exists
  DIPP_CUDA_ARCHS  semicolon list of SM numbers, default "80;90"
  NVCC             path of nvcc (default: found on PATH or in /usr/local/cuda/bin)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
           "-fvisibility=hidden"]
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-shared", "-cudart", "static"]


def relative_sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def compiler_accepts(compiler_cmd: list[str], flags: list[str]) -> bool:
    """True when the C compiler builds and links a tiny OpenMP program with flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [*compiler_cmd, *flags, str(src), "-o", str(Path(tmp) / "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def find_nvcc() -> str | None:
    """$NVCC when set (and then only it), else nvcc on PATH, else the default CUDA location."""
    explicit = os.environ.get("NVCC")
    candidates = (explicit,) if explicit else (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_archs() -> list[str]:
    archs = os.environ.get("DIPP_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    last = archs.split(";")[-1].strip()
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
    return flags


class BuildWithCuda(build_ext):
    """build_ext that adds OpenMP when available and builds libdipp_cuda.so."""

    def build_extensions(self) -> None:
        if os.environ.get("DIPP_CUDA", "").strip().lower() in ("1", "on", "yes", "true") and find_nvcc() is None:
            # fail before compiling anything
            raise RuntimeError("DIPP_CUDA=1 but nvcc was not found (set NVCC or add it to PATH)")
        compiler_cmd = list(self.compiler.compiler_so[:1])
        openmp = compiler_accepts(compiler_cmd, ["-fopenmp"])
        for ext in self.extensions:
            ext.extra_compile_args = C_FLAGS + (["-fopenmp"] if openmp else [])
            ext.extra_link_args = (["-fopenmp"] if openmp else []) + ["-ldl"]
        if not openmp:
            print("diffinstruct: compiler lacks OpenMP; CPU kernels run on one thread", file=sys.stderr)
        super().build_extensions()
        self.build_cuda()

    def build_cuda(self) -> None:
        mode = os.environ.get("DIPP_CUDA", "auto").strip().lower()
        self.cuda_library_path().unlink(missing_ok=True)  # a stale copy from an earlier build must not ship
        if mode in ("0", "off", "no", "false"):
            print("diffinstruct: DIPP_CUDA=0, skipping the CUDA kernels", file=sys.stderr)
            return
        nvcc = find_nvcc()
        if nvcc is None:
            if mode in ("1", "on", "yes", "true"):
                raise RuntimeError("DIPP_CUDA=1 but nvcc was not found (set NVCC or add it to PATH)")
            print("diffinstruct: nvcc not found, building without the CUDA kernels", file=sys.stderr)
            return
        sources = relative_sources("cuda/*.cu")
        headers = relative_sources("cuda/*.cuh") + relative_sources("csrc/*.h")
        cached = ROOT / "build" / "cuda" / "libdipp_cuda.so"
        newest = max(os.path.getmtime(ROOT / p) for p in sources + headers)
        if not cached.exists() or os.path.getmtime(cached) < newest:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cmd = [nvcc, *NVCC_FLAGS, *cuda_archs(), "-Icsrc", *sources, "-o", str(cached)]
            print("diffinstruct: " + " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT)
        target = self.cuda_library_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cached, target)
        if self.inplace or getattr(self, "editable_mode", False):
            shutil.copy2(cached, ROOT / "python_shim" / "diffinstruct" / "libdipp_cuda.so")
        self._cuda_built = True

    def cuda_library_path(self) -> Path:
        return Path(self.get_ext_fullpath("diffinstruct._core")).parent / "libdipp_cuda.so"

    def get_outputs(self) -> list[str]:
        # editable and wheel builds copy only what is listed here
        outputs = super().get_outputs()
        if getattr(self, "_cuda_built", False):
            outputs.append(str(self.cuda_library_path()))
        return outputs


core = Extension(
    "diffinstruct._core",
    sources=relative_sources("python_shim/*.c") + relative_sources("csrc/*.c"),
    include_dirs=["csrc", "python_shim", numpy.get_include()],
    depends=relative_sources("csrc/*.h") + relative_sources("python_shim/*.h"),
)

setup(
    ext_modules=[core],
    cmdclass={"build_ext": BuildWithCuda},
    # the ComfyUI node classes (the repository's nodes/ folder) ship in the wheel as diffinstruct.comfy_nodes
    package_dir={"": "python_shim", "diffinstruct.comfy_nodes": "nodes"},
    packages=[*find_packages(where="python_shim"), "diffinstruct.comfy_nodes"],
)
