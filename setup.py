"""Builds diffinstruct: the C extension (CPU kernels + binding) and, when nvcc
is found, the CUDA kernel library that the extension loads lazily. `pip install .` and `pip wheel .` build in
a temporary folder and leave the checkout as it was (no build/, no *.egg-info); editable and in-place builds put
the extension (and libdipp_cuda.so) next to the sources and keep nvcc's output in build/cuda.

Environment:
  DIPP_CUDA=1      require the CUDA library (fail without nvcc)
  DIPP_CUDA=0      skip CUDA even when nvcc exists
  DIPP_CUDA_ARCHS  semicolon list of SM numbers, default "75;80;86;89;90;120" (Turing to Blackwell;
                   the defaults the installed nvcc cannot build are left out), plus PTX of the last
                   one for newer GPUs. Each architecture adds ~0.56 MB to libdipp_cuda.so: six and
                   PTX make it 4.4 MB (2.2 MB for sm_80 + sm_90 + PTX), the wheel 3.95 MB (3.43 MB).
  NVCC             path of nvcc (default: found on PATH or in /usr/local/cuda/bin)
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy
from setuptools import Extension, find_packages, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext
from setuptools.command.egg_info import egg_info

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


DEFAULT_CUDA_ARCHS = ("75", "80", "86", "89", "90", "120")


def nvcc_archs(nvcc: str) -> set[str] | None:
    """SM numbers the nvcc builds for (`nvcc --list-gpu-arch`), None when it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = {line.strip().removeprefix("compute_") for line in out.split() if line.strip().startswith("compute_")}
    return found or None


def cuda_arch_list(nvcc: str) -> list[str]:
    """DIPP_CUDA_ARCHS as given (nvcc then refuses what it cannot build), or the defaults this nvcc supports."""
    explicit = os.environ.get("DIPP_CUDA_ARCHS", "").strip()
    if explicit:
        return [a.strip() for a in explicit.split(";") if a.strip()]
    supported = nvcc_archs(nvcc)
    archs = [a for a in DEFAULT_CUDA_ARCHS if supported is None or a in supported]
    left_out = sorted(set(DEFAULT_CUDA_ARCHS) - set(archs), key=int)
    if left_out:
        print(f"diffinstruct: {nvcc} cannot build sm_{', sm_'.join(left_out)}; leaving them out", file=sys.stderr)
    if not archs:
        raise RuntimeError(f"{nvcc} supports none of sm_{', sm_'.join(DEFAULT_CUDA_ARCHS)}; set DIPP_CUDA_ARCHS")
    return archs


def cuda_archs(nvcc: str) -> list[str]:
    archs = cuda_arch_list(nvcc)
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


_SCRATCH: list[Path] = []


def scratch_dir(name: str) -> str:
    """A folder `name` in one temporary folder outside the source tree, removed when this process ends.

    `pip install .` / `pip wheel .` run setup.py inside the user's checkout (for the node pack that is
    ComfyUI/custom_nodes/ComfyUI-DiffInstruct); setuptools' defaults would leave build/ and
    python_shim/diffinstruct.egg-info there. pip runs each build hook in a process of its own, and the
    wheel is written to pip's own folder, so nothing here is needed once the process ends."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="diffinstruct-build-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], ignore_errors=True)
    path = _SCRATCH[0] / name
    path.mkdir(exist_ok=True)
    return str(path)


def user_set(command: Any, name: str, option: str) -> bool:
    """True when the command line or a config file gave command `name` the option (then it is left as given)."""
    return option in command.distribution.get_option_dict(name)


class BuildOutOfTree(build):
    """build whose build_base (hence build_temp, build_lib and bdist_wheel's staging folder) is a temporary
    folder unless --build-base is given. Editable and in-place builds still put the extension next to the
    sources: they set build_ext's output themselves."""

    def finalize_options(self) -> None:
        if not user_set(self, "build", "build_base"):
            self.build_base = scratch_dir("build")
        super().finalize_options()


class EggInfoOutOfTree(egg_info):
    """egg_info writing diffinstruct.egg-info into a temporary folder instead of python_shim/ unless
    --egg-base is given (pip's metadata step and editable installs pass their own folder)."""

    def finalize_options(self) -> None:
        if self.egg_base is None and not user_set(self, "egg_info", "egg_base"):
            self.egg_base = scratch_dir("egg-info")
        super().finalize_options()


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
        cached = self.cuda_cache_dir() / "libdipp_cuda.so"
        # the command is part of the cache key: another nvcc or architecture list must rebuild
        recorded = cached.with_suffix(".command")
        cmd = [nvcc, *NVCC_FLAGS, *cuda_archs(nvcc), "-Icsrc", *sources, "-o", str(cached)]
        newest = max(os.path.getmtime(ROOT / p) for p in sources + headers)
        if (not cached.exists() or os.path.getmtime(cached) < newest or not recorded.exists()
                or recorded.read_text() != " ".join(cmd)):
            cached.parent.mkdir(parents=True, exist_ok=True)
            recorded.unlink(missing_ok=True)
            print("diffinstruct: " + " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT)
            recorded.write_text(" ".join(cmd))
        target = self.cuda_library_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cached, target)
        if self.inplace or getattr(self, "editable_mode", False):
            shutil.copy2(cached, ROOT / "python_shim" / "diffinstruct" / "libdipp_cuda.so")
        self._cuda_built = True

    def cuda_cache_dir(self) -> Path:
        """Where nvcc's output is kept between builds (compiling every architecture takes minutes).

        Editable / in-place builds (`make build`) keep it in the tree's build/cuda, as does any build in a
        tree that already has one (a developer's checkout: `make test` builds wheels from it). A build from
        a clean checkout (`pip install .` in ComfyUI's custom_nodes) compiles into build_temp, which
        BuildOutOfTree places outside the tree."""
        in_tree = ROOT / "build" / "cuda"
        if self.inplace or getattr(self, "editable_mode", False) or in_tree.is_dir():
            return in_tree
        return Path(self.build_temp).resolve() / "cuda"

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
    cmdclass={"build": BuildOutOfTree, "egg_info": EggInfoOutOfTree, "build_ext": BuildWithCuda},
    package_dir={"": "python_shim"},
    packages=find_packages(where="python_shim"),
)
