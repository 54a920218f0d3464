"""The counter-based hash behind seeded sampling, in torch (the reference the Triton sampler matches bit for bit).

E[s, v] ~ Exp(1) is a pure function of (seed, output position, token): a seeded request draws the same tokens
whatever else is in the batch, and a preempted request redraws exactly what it drew before."""
from __future__ import annotations

import torch

_M1 = -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64 (splitmix64 finalizer constants)
_M2 = -7723592293110705685  # 0x94d049bb133111eb
GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15


def mix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps; `>>` is arithmetic on signed ints, so mask to make it a logical shift.
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return mix64(seeds * GOLDEN + positions)


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """E[s, v] ~ Exp(1), a pure function of (seeds[s], positions[s], v)."""
    x = mix64(row_keys(seeds, positions).unsqueeze(1) + torch.arange(vocab, device=seeds.device).unsqueeze(0) * GOLDEN)
    return -torch.log(unit_interval(x))


def unit_interval(x: torch.Tensor) -> torch.Tensor:
    """The top 23 bits of 64-bit hashes as float32 in the open interval (0, 1). With 24 bits the largest value,
    1 - 2^-25, rounds to 1.0 in float32: E = -log(1) = 0, and p / E made one token in 2^24 win every draw it was
    in (or, filtered out with p = 0, gave NaN, which argmax picks)."""
    return (((x >> 41) & 0x7FFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
