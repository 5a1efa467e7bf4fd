"""Stateless random streams: every draw of a step is keyed by (seed, rank, step, purpose).

Resuming at step k therefore draws exactly what an uninterrupted run draws, with
no generator state to save, and ranks never share noise.
"""

from __future__ import annotations

PURPOSES = {"z": 1, "sigma": 2, "eps": 3, "prompts": 4, "ta_z": 5, "ta_sigma": 6, "ta_eps": 7, "ta_prompts": 8,
            "sample": 9}
MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, purpose: str, rank: int = 0, micro: int = 0) -> int:
    """A 64-bit Philox key for one draw."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random purpose {purpose!r}")
    x = splitmix64(seed & MASK64)
    for part in (rank, step, PURPOSES[purpose], micro):
        x = splitmix64(x ^ (part & MASK64))
    return x
