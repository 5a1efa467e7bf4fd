"""Shared fixtures: the built extension, dtypes under test, CUDA availability."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from diffinstruct import _core
from diffinstruct.kernels import backend

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances for comparing a kernel's output with the float64 NumPy reference,
# per output dtype: float32 arithmetic inside, then one rounding to the output dtype.
TOLERANCES = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def cuda_device_available() -> bool:
    return torch.cuda.is_available() and backend.cuda_kernels_loaded()


requires_cuda = pytest.mark.skipif(
    not cuda_device_available(),
    reason="no CUDA device here (torch.cuda.is_available() is False or libdipp_cuda.so missing): "
    "CPU-vs-CUDA parity runs only on a GPU machine",
)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; the previous count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def core():
    return _core


def as64(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as float64 NumPy (bfloat16 included)."""
    return t.detach().to(torch.float64).cpu().numpy()


class NetworkBlocked(RuntimeError):
    """Raised by the no_network fixture on any attempt to reach the network."""


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails; returns the attempts (loaders must need none)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the loaders must not rely on the user setting these
        monkeypatch.delenv(var, raising=False)
    return attempts
