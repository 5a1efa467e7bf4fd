"""A real ComfyUI server (COMFYUI_PATH's main.py, its real frontend) on loopback, with the pack installed by one
of the two routes: "clone" (the repository linked into custom_nodes/) or "wheel" (the installer's loader folder,
the package importable from python_shim/ as from an installed wheel)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    base: Path
    module: str  # the pack's name in ComfyUI (its folder in custom_nodes/)
    log: Path
    process: subprocess.Popen

    def get(self, path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()

    def get_json(self, path: str) -> object:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body[:200])
        return json.loads(body)

    def post_json(self, path: str, payload: object) -> tuple[int, object]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode("utf-8"),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def install(base: Path, route: str, python: Path | None = None) -> str:
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    if route == "clone":
        (custom / "diffinstruct").symlink_to(ROOT, target_is_directory=True)
        return "diffinstruct"
    if python is not None:  # an installed wheel: its own installer writes the loader
        env = {**os.environ, "PYTHONPATH": str(python)}
        subprocess.run([sys.executable, "-m", "diffinstruct.comfyui", "install", "--comfyui", str(custom)], env=env,
                       check=True, capture_output=True, cwd=str(base))
        return "diffinstruct_loader"
    from diffinstruct import comfyui

    return comfyui.install(base / "custom_nodes").name


@contextlib.contextmanager
def comfy_server(comfy: str, base: Path, route: str, python: Path | None = None,
                 env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start main.py on a free loopback port (CPU, an in-memory database) and stop it on leaving. `python`: a
    folder holding an installed wheel (pip install --target), used instead of the checkout's python_shim/; `env`:
    extra environment variables for the server."""
    module = install(base, route, python)
    port = free_port()
    log = base / "server.log"
    env = {**os.environ, "PYTHONPATH": str(python or ROOT / "python_shim"), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "auto"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", base, module, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{server.log_text()[-3000:]}")
            try:
                if server.get("/system_stats")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI did not start in {START_TIMEOUT_S:.0f} s:\n{server.log_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
