"""Fused sampling for the common case (temperature only, no top-k/top-p/min-p filter): one pass over the logits.

The exponential race argmax(p_i / E_i) equals argmax(logit_i / T - log E_i), so no softmax is needed. E_i comes
from the same counter-based hash of (seed, position, token) as the torch sampler, bit for bit."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.layers.sampler import _GOLDEN, _mix64


@triton.jit
def _mix(x):
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, row_key_ptr, temp_ptr, out_ptr, vocab, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = tl.load(row_key_ptr + row).to(tl.uint64)
    temp = tl.load(temp_ptr + row)
    greedy = temp < 1e-5
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int64)
    for start in range(0, vocab, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < vocab
        z = tl.load(logits_ptr + row * stride + idx, mask=ok, other=float("-inf")).to(tl.float32)
        if not greedy:
            x = _mix(key + idx.to(tl.uint64) * 0x9E3779B97F4A7C15)
            u = ((x >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            z = z * inv_t - tl.log(-tl.log(u))
        take = z > best
        best = tl.where(take, z, best)
        best_i = tl.where(take, idx.to(tl.int64), best_i)
    m = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == m, best_i, vocab), 0))


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row: greedy argmax if its temperature is 0, else a seeded draw from softmax(logits / T)."""
    rows, vocab = logits.shape
    row_key = _mix64(seeds * _GOLDEN + positions)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(rows,)](logits, row_key, temperature, out, vocab, logits.stride(0), BLOCK=2048, num_warps=8)
    return out
