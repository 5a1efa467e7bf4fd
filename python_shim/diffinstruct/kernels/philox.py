"""Philox4x32-10 and the normal/uniform transforms in PyTorch, matching csrc/dipp_math.h.

32-bit products are formed from 16-bit limbs in int64 so that no intermediate
overflows a signed 64-bit integer.
"""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hi and lo words of the 64-bit product a * b (a constant, b uint32 in int64)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low = a * b_lo  # < 2^48
    high = a * b_hi  # < 2^48
    lo = (low + ((high & 0xFFFF) << 16)) & MASK32
    hi = (high >> 16) + ((low + ((high & 0xFFFF) << 16)) >> 32)
    return hi & MASK32, lo


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return [c0, c1, c2, c3]


def blocks(seed: int, first_block: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[count, 4] Philox outputs of blocks first_block .. first_block + count - 1, as int64."""
    block = torch.arange(count, dtype=torch.int64, device=device) + first_block
    block = block & ((1 << 64) - 1) if first_block + count >= (1 << 63) else block
    counter = [block & MASK32, (block >> 32) & MASK32, torch.zeros_like(block), torch.zeros_like(block)]
    return torch.stack(philox4x32_10(counter, (seed & MASK32, (seed >> 32) & MASK32)), dim=1)


def uniform_open(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07


def normal4(bits: torch.Tensor) -> torch.Tensor:
    """Box-Muller over lanes (0, 1) and (2, 3) of each block, float32 as the kernels compute it."""
    u = uniform_open(bits)
    two_pi = torch.tensor(2.0 * math.pi, dtype=torch.float32)
    out = torch.empty_like(u)
    for pair in range(2):
        radius = torch.sqrt(-2.0 * torch.log(u[:, 2 * pair]))
        angle = two_pi * u[:, 2 * pair + 1]
        out[:, 2 * pair] = radius * torch.cos(angle)
        out[:, 2 * pair + 1] = radius * torch.sin(angle)
    return out


def stream(seed: int, offset: int, n: int, normal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements 0 .. n-1 of the (seed, offset) stream, float32."""
    bits = blocks(seed, offset, (n + 3) // 4, device)
    values = normal4(bits) if normal else uniform_open(bits)
    return values.reshape(-1)[:n]
