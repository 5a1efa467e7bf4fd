"""The CUDA kernels of cuda/*.cu on the CPU: builds them with g++ against the CPU runtime in
cuda/host_emu, and drives them through the real binding (diffinstruct._core's CUDA path).

- `build_library(threads=256)` compiles the unmodified .cu files (g++, FMA contraction off like
  nvcc --fmad=false) into a library with libdipp_cuda.so's exports; `threads` rebuilds them for
  another DIPP_CUDA_THREADS block size. Cached under build/host_emu/ by a hash of the sources; each new
  build prunes the folders past the KEEP_BUILDS most recently used (`prune`).
- `Emulated(lib)` is a fresh instance of the extension module whose CUDA library is that build
  (multi-phase init gives every instance its own state, so the process's own _core is untouched).
- `on_device(t)` presents a CPU tensor as a CUDA tensor to the binding: DLPack device (kDLCUDA, id)
  over the same host memory, which the CPU runtime dereferences as device memory.
- `Stream` is a runtime stream: pass `stream=s.handle`; `s.stats()` says what ran on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import diffinstruct
from diffinstruct import _core

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "cuda" / "host_emu"
HAVE_GXX = shutil.which("g++") is not None
# the flags that make the CPU build round as the CUDA build does (setup.py: --fmad=false; C_FLAGS)
GXX_FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-ffp-contract=off",
             "-fno-fast-math", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
KDL_CUDA = 2


PROBES = ROOT / "tests" / "host_emu" / "probe_kernels.cu"


def kernel_sources() -> list[Path]:
    return sorted((ROOT / "cuda").glob("*.cu"))


def runtime_sources() -> list[Path]:
    return sorted(EMU.glob("*.cpp"))


def headers() -> list[Path]:
    return [*sorted((ROOT / "cuda").glob("*.cuh")), *sorted(EMU.glob("*.h")), EMU / "exports.map",
            *sorted((ROOT / "csrc").glob("*.h"))]


def build_command(output: Path, sources: list[Path], threads: int | None = None) -> list[str]:
    defines = [] if threads is None else [f"-DDIPP_CUDA_THREADS={threads}"]
    if PROBES in sources:  # the probes export their entry points themselves
        link = ["-fvisibility=hidden"]
    else:  # exactly libdipp_cuda.so's exports plus the runtime's test controls
        link = [f"-Wl,--version-script={EMU / 'exports.map'}"]
    return ["g++", *GXX_FLAGS, *defines, *link, f"-I{EMU}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'csrc'}", "-x", "c++",
            *map(str, sources), "-o", str(output)]


CACHE = ROOT / "build" / "host_emu"
# Builds kept: each edit of a kernel source or header makes four new ones (release, 32 and 1024 threads, probes);
# twelve keep the last three versions' worth, so switching back and forth while editing does not rebuild.
KEEP_BUILDS = 12
PRUNE_GRACE_S = 600.0  # a build used this recently is kept whatever its rank: another run may be about to load it


def prune(cache: Path = CACHE, keep: int = KEEP_BUILDS, grace_s: float = PRUNE_GRACE_S) -> list[Path]:
    """Removes the build folders of `cache` past the `keep` most recently used (and unused for `grace_s`);
    returns those removed. A library already loaded stays valid after its file is removed."""
    now = time.time()
    folders = sorted((p for p in cache.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True) \
        if cache.is_dir() else []
    removed = []
    for folder in folders[keep:]:
        try:
            if now - folder.stat().st_mtime > grace_s:
                shutil.rmtree(folder)
                removed.append(folder)
        except FileNotFoundError:  # another run pruned it first
            pass
    return removed


def _build(name: str, sources: list[Path], threads: int | None) -> Path:
    digest = hashlib.sha256()
    for path in sources + headers():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(build_command(Path("x"), sources, threads)).encode())
    out = CACHE / f"{digest.hexdigest()[:16]}-t{threads or 'default'}" / name
    if out.exists():
        try:
            os.utime(out.parent)  # used now: the folder's time is what prune ranks by
        except OSError:  # a read-only cache is used as it is
            pass
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(build_command(tmp, sources, threads), capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed to build {name}:\n{result.stderr}")
        os.replace(tmp, out)
        prune()
    return out


def build_library(threads: int | None = None) -> Path:
    """The emulated libdipp_cuda.so for DIPP_CUDA_THREADS=threads (None: the release value)."""
    return _build("libdipp_cuda_emu.so", kernel_sources() + runtime_sources(), threads)


def build_probes() -> Path:
    """The runtime with the probe kernels of tests/host_emu/probe_kernels.cu."""
    return _build("libdipp_emu_probes.so", [PROBES, *runtime_sources()], None)


class Stats(ctypes.Structure):
    class Kernel(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char * 96), ("launches", ctypes.c_int64), ("min_grid", ctypes.c_uint32),
                    ("max_grid", ctypes.c_uint32), ("block", ctypes.c_uint32)]

    _fields_ = [("launches", ctypes.c_int64), ("failed", ctypes.c_int64), ("threads", ctypes.c_int64),
                ("shuffles", ctypes.c_int64), ("allocs", ctypes.c_int64), ("frees", ctypes.c_int64),
                ("live_bytes", ctypes.c_int64), ("peak_bytes", ctypes.c_int64), ("kernel_count", ctypes.c_int32),
                ("kernels", Kernel * 32), ("message", ctypes.c_char * 256)]

    def kernel_table(self) -> dict[str, Any]:
        return {k.name.decode(): k for k in self.kernels[:self.kernel_count]}


class Runtime:
    """ctypes view of the runtime's test controls (dipp_emu.h) in one emulated library."""

    def __init__(self, lib: Path) -> None:
        self.lib = ctypes.CDLL(str(lib))  # the same handle the binding's dlopen gets
        self.lib.dipp_emu_stream_create.restype = ctypes.c_void_p
        self.lib.dipp_emu_stream_create.argtypes = [ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64]
        self.lib.dipp_emu_stream_destroy.argtypes = [ctypes.c_void_p]
        self.lib.dipp_emu_stream_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(Stats)]
        self.lib.dipp_emu_last_message.restype = ctypes.c_char_p
        self.threads_per_block = self.lib.dipp_emu_threads_per_block()


class Stream:
    def __init__(self, runtime: Runtime, max_grid: int = 0, fail_alloc_at: int = 0, fail_launch_at: int = 0) -> None:
        self.runtime = runtime
        self.handle = runtime.lib.dipp_emu_stream_create(max_grid, fail_alloc_at, fail_launch_at)
        assert self.handle, "dipp_emu_stream_create: out of memory"

    def stats(self) -> Stats:
        out = Stats()
        assert self.runtime.lib.dipp_emu_stream_stats(self.handle, ctypes.byref(out)) == 0
        return out

    def close(self) -> None:
        if self.handle:
            self.runtime.lib.dipp_emu_stream_destroy(self.handle)
            self.handle = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_core() -> Any:
    """A new instance of diffinstruct._core with its own state (nothing loaded yet)."""
    loader = importlib.machinery.ExtensionFileLoader("diffinstruct._core", _core.__file__)
    spec = importlib.util.spec_from_file_location("diffinstruct._core", _core.__file__, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_core(cuda_library: Path | str) -> Any:
    """A new instance of diffinstruct._core whose lazily loaded CUDA library is `cuda_library`."""
    module = new_core()
    before = os.environ.get("DIPP_CUDA_LIBRARY")
    os.environ["DIPP_CUDA_LIBRARY"] = str(cuda_library)
    try:
        module.cuda_status(load=True)  # the path is read at the first load only
    finally:
        if before is None:
            del os.environ["DIPP_CUDA_LIBRARY"]
        else:
            os.environ["DIPP_CUDA_LIBRARY"] = before
    return module


class Emulated:
    """The emulated CUDA kernels behind a private extension instance, plus their runtime."""

    def __init__(self, lib: Path) -> None:
        self.path = lib
        self.core = fresh_core(lib)
        loaded, _path, reason = self.core.cuda_status()
        assert loaded, reason
        self.runtime = Runtime(lib)

    def stream(self, **kwargs: int) -> Stream:
        return Stream(self.runtime, **kwargs)


_PY_CAPSULE_GET_POINTER = ctypes.pythonapi.PyCapsule_GetPointer
_PY_CAPSULE_GET_POINTER.restype = ctypes.c_void_p
_PY_CAPSULE_GET_POINTER.argtypes = [ctypes.py_object, ctypes.c_char_p]


class OnDevice:
    """A CPU tensor that the binding sees as CUDA device `device_id` (same memory). Records the
    `stream` argument each __dlpack__ call got, which the binding sets to -1 for CUDA."""

    def __init__(self, tensor: torch.Tensor, device_id: int = 0) -> None:
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
        self.tensor = tensor
        self.device_id = device_id
        self.requests: list[Any] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return KDL_CUDA, self.device_id

    def __dlpack__(self, stream: Any = None, max_version: Any = None, **_: Any) -> Any:
        self.requests.append(stream)
        capsule = torch.utils.dlpack.to_dlpack(self.tensor)  # a 0.x "dltensor" capsule
        managed = _PY_CAPSULE_GET_POINTER(capsule, b"dltensor")
        # DLManagedTensor starts with DLTensor {void *data; DLDevice {int32 type, id}; ...}
        ctypes.c_int32.from_address(managed + 8).value = KDL_CUDA
        ctypes.c_int32.from_address(managed + 12).value = self.device_id
        return capsule


def on_device(x: Any, device_id: int = 0) -> Any:
    """`x` (a tensor, or a list of tensors) as seen on the emulated device."""
    if isinstance(x, list | tuple):
        return [on_device(t, device_id) for t in x]
    return None if x is None else OnDevice(x, device_id)


PACKAGE = Path(diffinstruct.__file__).parent
