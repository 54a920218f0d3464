"""Fused sampling for the common case (temperature only, no top-k/top-p/min-p filter): one pass over the logits.

The exponential race argmax(p_i / E_i) equals argmax(logit_i / T - log E_i), so no softmax is needed. E_i comes
from the same counter-based hash of (seed, position, token) as the torch sampler, bit for bit. A grammar's bitmask
(structured output: bit t of word t // 32 set where token t may be drawn) is read in the same pass: a refused token
never enters the race, with no float copy of the logits and no mask expanded to one byte a token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import cdiv
from slipstream.kernels._pdl import await_inputs, pdl
from slipstream.sampling_params import GREEDY_BELOW

_GREEDY_BELOW = tl.constexpr(GREEDY_BELOW)  # jit code reads globals only as constexpr


@triton.jit
def _mix(x):
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


# The per-row scalars come as views into one packed upload (runner/sampling.py): whether seed_ptr is 16-byte aligned
# follows the batch's parity, and Triton would compile a variant for each (362 ms into serving on the H200)
@triton.jit(do_not_specialize=["vocab", "chunk", "mask_stride"],
            do_not_specialize_on_alignment=["seed_ptr", "pos_ptr", "temp_ptr"])
def _race_kernel(logits_ptr, seed_ptr, pos_ptr, temp_ptr, mask_ptr, val_ptr, idx_ptr, vocab, stride, mask_stride, chunk,
                 SAMPLED: tl.constexpr, MASKED: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    """Best (score, index) of one row over one vocabulary chunk."""
    await_inputs(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    greedy = True
    if SAMPLED:
        # hash.row_keys, here rather than in torch: its dozen elementwise ops were a dozen launches every step
        # (8% of the engine core's host time serving 400 streams on the H200)
        seed = tl.load(seed_ptr + row).to(tl.uint64)
        key = _mix(seed * 0x9E3779B97F4A7C15 + tl.load(pos_ptr + row).to(tl.uint64))
        temp = tl.load(temp_ptr + row)
        greedy = temp < _GREEDY_BELOW
        inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int64)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, vocab)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < hi
        z = tl.load(logits_ptr + row * stride + idx, mask=ok, other=float("-inf")).to(tl.float32)
        if MASKED:  # each word serves 32 neighbouring tokens: loaded once from memory, then from L1
            word = tl.load(mask_ptr + row * mask_stride + idx // 32, mask=ok, other=0)
            z = tl.where(((word >> (idx % 32)) & 1) != 0, z, float("-inf"))
        if SAMPLED:
            if not greedy:
                x = _mix(key + idx.to(tl.uint64) * 0x9E3779B97F4A7C15)
                u = ((x >> 41).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # 23 bits: u < 1 in float32 (hash.py)
                z = z * inv_t - tl.log(-tl.log(u))
        take = z > best
        best = tl.where(take, z, best)
        best_i = tl.where(take, idx.to(tl.int64), best_i)
    m = tl.max(best, 0)
    tl.store(val_ptr + row * MAX_SPLITS + split, m)
    tl.store(idx_ptr + row * MAX_SPLITS + split, tl.min(tl.where(best == m, best_i, vocab), 0))


@triton.jit(do_not_specialize=["splits"])  # 1 from 2 x SMs rows on: no new variant for big batches mid-serving
def _pick_kernel(val_ptr, idx_ptr, out_ptr, splits, vocab, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Across the chunks of one row: the highest score, the lowest index among ties (as torch.argmax)."""
    await_inputs(PDL)
    row = tl.program_id(0)
    j = tl.arange(0, MAX_SPLITS)
    ok = j < splits
    v = tl.load(val_ptr + row * MAX_SPLITS + j, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * MAX_SPLITS + j, mask=ok, other=vocab)
    m = tl.max(v, 0)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (v == m), i, vocab), 0))


_MAX_SPLITS = 64
_BLOCK = 2048


def _race(logits: torch.Tensor, seeds: torch.Tensor | None, positions: torch.Tensor | None,
          temperature: torch.Tensor | None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    # A 128K vocabulary in one program per row takes ~35 us at batch 1: split rows over enough programs to fill
    # the GPU, then pick across the splits.
    rows, vocab = logits.shape
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 1
    splits = max(1, min(_MAX_SPLITS, cdiv(2 * sms, rows), cdiv(vocab, _BLOCK)))
    chunk = cdiv(cdiv(vocab, splits), _BLOCK) * _BLOCK
    splits = cdiv(vocab, chunk)
    vals = torch.empty(rows, _MAX_SPLITS, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, _MAX_SPLITS, dtype=torch.int64, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    sampled, masked = seeds is not None, allowed is not None
    _race_kernel[(rows, splits)](logits, *((seeds, positions, temperature) if sampled else (logits,) * 3),
                                 allowed if masked else logits, vals, idxs, vocab, logits.stride(0),
                                 allowed.stride(0) if masked else 0, chunk, SAMPLED=sampled, MASKED=masked,
                                 MAX_SPLITS=_MAX_SPLITS, BLOCK=_BLOCK, num_warps=8, **pdl(logits))
    _pick_kernel[(rows,)](vals, idxs, out, splits, vocab, MAX_SPLITS=_MAX_SPLITS, num_warps=1, **pdl(vals))
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: greedy argmax if its temperature is 0, else a seeded draw from softmax(logits / T); with `allowed`
    (int32 [rows, ceil(vocab / 32)]) among the tokens whose bit is set."""
    return _race(logits, seeds, positions, temperature, allowed)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) (lowest index among ties), split over the GPU instead of one program per row."""
    return _race(logits, None, None, None)
