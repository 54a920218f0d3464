"""Fused Mixture-of-Experts: tokens sorted by expert, then one grouped GEMM per projection.

Each of T tokens goes to k experts. `align_by_expert` lays the T * k (token, expert) pairs out expert by expert,
each expert's run padded to a multiple of BLOCK_M, in buffers whose size depends only on T, k and E, with no sort
and no host sync (so a CUDA graph can hold it): `sorted_ids` lists pair indices (pair = token * k + slot; padding holds T * k), and
`block_expert` names the expert of each BLOCK_M rows (-1 past the used blocks). The grouped GEMM then runs one
program per (BLOCK_M pairs, BLOCK_N outputs): it gathers its rows of A, streams only its expert's weight tile,
and scatters the result to the pairs' rows. Experts that received no pair own no block, so a batch-1 decode
step reads the weights of its k selected experts only. Steps of a few tokens run `grouped_gemv` instead: the
GEMMs' tiles there leave most SMs idle (one token: 96 programs walking K = 2,048 alone on an H200, 30% of its copy
rate), while the dense GEMV's form streams the same bytes with every SM. Which of the two runs at a token count is
the tuned table's choice, or a heuristic's (`gemv_pays`). The router runs as one kernel too (`route`): scores,
bias, grouped selection, top k and renormalization, where torch took about ten launches a layer.

  - gate-up with SwiGLU fused: the program keeps two accumulators, over the gate rows n and the up rows I + n of
    the expert's stacked [gate | up] weight, and writes silu(gate) * up: the [pairs, 2I] intermediate never
    exists;
  - down with the routing weight fused: each pair's output row is scaled by its weight before it is written;
    the k rows of a token are then summed.

FP8 experts (W8A16): the weight tiles stream as FP8 (half the bytes of 16-bit), are widened in registers (exactly)
and multiplied by the 16-bit activations; the scales apply to the accumulator: once at the end for a scale per
output channel, or after each K tile's product for a scale per (rows x columns) block (DeepSeek-V3 / Qwen3-FP8
128 x 128), so a K tile never straddles two blocks. 4-bit experts (W4A16: AWQ, GPTQ, compressed-tensors, NVFP4,
MXFP4 as kernels/int4.py lays them out) stream a quarter of the bytes, plus their group scales, and are dequantized a
tile at a time, each K tile inside one group.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET, cdiv, dot_precision, next_pow2
from slipstream.kernels._pdl import await_inputs, pdl
from slipstream.kernels.int4 import CODE_FP4, CODE_S8, CODE_U4, block_k, dequant_tile, fine_groups
from slipstream.kernels import matvec
from slipstream.kernels._slices import COUNTS
from slipstream.kernels.matvec import (FIXED as GEMV_FIXED, ONE_ROW_CONFIGS, finish_slices, slice_workspace, weight_form,
                                       weight_tile)

log = logging.getLogger(__name__)
# Tile tables `slipstream tune moe` measured, one file per GPU and layer shape (tiles_file names it):
# {"device": ..., "triton": ..., "tiles": {tokens: {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages} or {GEMV: true}}}
TUNED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "moe")


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, pairs, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    e = tl.program_id(0)
    n = tl.zeros([BLOCK], dtype=tl.int32)
    for p0 in range(0, pairs, BLOCK):
        ps = p0 + tl.arange(0, BLOCK)
        n += (tl.load(ids_ptr + ps, mask=ps < pairs, other=-1) == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(n, 0))


@triton.jit
def _place_kernel(ids_ptr, starts_ptr, counts_ptr, sorted_ptr, block_expert_ptr, pairs,
                  BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    e = tl.program_id(0)
    start = tl.load(starts_ptr + e)
    placed = start
    for p0 in range(0, pairs, BLOCK):
        ps = p0 + tl.arange(0, BLOCK)
        hit = (tl.load(ids_ptr + ps, mask=ps < pairs, other=-1) == e).to(tl.int32)
        pos = placed + tl.cumsum(hit, 0) - hit  # this expert's pairs, in token order
        tl.store(sorted_ptr + pos, ps, mask=hit > 0)
        placed += tl.sum(hit, 0)
    for b in range(0, (tl.load(counts_ptr + e) + BLOCK_M - 1) // BLOCK_M):
        tl.store(block_expert_ptr + start // BLOCK_M + b, e)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [T*k + E*(block_m-1), rounded up to block_m] int32, block_expert [that /
    block_m] int32). Two small kernels, one program per expert (count, then place), and cumulative sums: no sort
    and no host sync, so a CUDA graph can hold it."""
    flat = topk_ids.reshape(-1).to(torch.int32).contiguous()
    pairs = flat.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    _count_kernel[(num_experts,)](flat, counts, pairs, BLOCK=1024, **pdl(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    starts = (torch.cumsum(padded, 0) - padded).to(torch.int32)
    capacity = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    block_expert = torch.full((capacity // block_m,), -1, dtype=torch.int32, device=flat.device)
    _place_kernel[(num_experts,)](flat, starts, counts, sorted_ids, block_expert, pairs, BLOCK_M=block_m, BLOCK=1024,
                                  **pdl(flat))
    return sorted_ids, block_expert


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, stride_l, scale,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                  TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr):
    await_inputs(PDL)
    t = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    ok = es < E
    logit = tl.load(logits_ptr + t.to(tl.int64) * stride_l + es, mask=ok, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logit)
    else:
        p = tl.exp(logit - tl.max(logit, 0))
        scores = p / tl.sum(p, 0)
    choose = scores
    if HAS_BIAS:  # for selection only
        choose += tl.load(bias_ptr + es, mask=ok, other=0.0).to(tl.float32)
    # (a NaN score is never chosen: Triton's argmax passes over NaN, so a token with NaN logits could be given a padding
    # lane, an id past the experts, whose pair the GEMMs never place: its output row would be left unwritten)
    choose = tl.where(ok & (choose == choose), choose, -float("inf"))
    if GROUPS > 1:  # only the best TOPK_GROUPS groups of BLOCK_E / GROUPS experts are eligible
        per: tl.constexpr = BLOCK_E // GROUPS
        g2 = tl.reshape(choose, [GROUPS, per])
        cols = tl.arange(0, per)[None, :]
        best = tl.max(g2, 1)
        if HAS_BIAS:  # a group's score: the sum of its two best
            second = tl.max(tl.where(cols == tl.argmax(g2, 1, tie_break_left=True)[:, None], -float("inf"), g2), 1)
            best = best + second
        gs = tl.arange(0, GROUPS)
        keep = tl.zeros([GROUPS], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUPS):
            g = tl.argmax(best, 0, tie_break_left=True)
            keep = tl.where(gs == g, 1, keep)
            best = tl.where(gs == g, -float("inf"), best)
        choose = tl.reshape(tl.where(keep[:, None] != 0, g2, -float("inf")), [BLOCK_E])
    ks = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.int32)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # the best left, lowest index first among ties
        i = tl.argmax(choose, 0, tie_break_left=True)
        picked = tl.where(ks == j, i, picked)
        w = tl.where(ks == j, tl.sum(tl.where(es == i, scores, 0.0), 0), w)
        choose = tl.where(es == i, -float("inf"), choose)
    if RENORMALIZE:
        w = w / tl.sum(w, 0)
    tl.store(weights_ptr + t * TOP_K + ks, w * scale, mask=ks < TOP_K)
    tl.store(ids_ptr + t * TOP_K + ks, picked, mask=ks < TOP_K)


def routable(num_experts: int, num_groups: int) -> bool:
    """Whether `route` takes this grouping: a power-of-two number of groups and of experts in each (or no groups)."""
    per = num_experts // num_groups
    return num_groups == 1 or not (num_groups & (num_groups - 1) or per & (per - 1))


def route(logits: torch.Tensor, top_k: int, *, sigmoid: bool = False, bias: torch.Tensor | None = None,
          num_groups: int = 1, topk_groups: int = 1, renormalize: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32), as layers/moe.py's `route` (the
    reference) computes them, in one kernel: softmax (or sigmoid) scores in float32; `bias` added for selection only;
    with `num_groups` > 1 only the experts of the best `topk_groups` groups eligible (a group scored by its best, or
    with a bias by its two best); the top k, best first (ties to the lowest expert id); weights renormalized to sum
    to one, times `scale`. Grouped selection needs a power-of-two number of groups and of experts per group."""
    logits = logits.contiguous()
    t, e = logits.shape
    if not routable(e, num_groups):
        raise ValueError(f"the routing kernel groups {e} experts in {num_groups} groups: both the groups and the "
                         "experts per group must be powers of two")
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    # (a warp a token up to 512 experts: the k passes of argmax are warp shuffles, not reductions through shared
    # memory across warps; at batch 1 the kernel is all latency: 4.1 us with four warps on an H100, lease AM)
    _route_kernel[(t,)](logits, bias if bias is not None else logits, weights, ids, e, logits.stride(0), scale,
                        SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUPS=num_groups, TOPK_GROUPS=topk_groups,
                        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_E=next_pow2(e), BLOCK_K=next_pow2(top_k),
                        num_warps=1 if e <= 512 else 4, **pdl(logits))
    return weights, ids


class Fp8Experts(NamedTuple):
    """FP8 expert weights' scales: per output row ([E, 2I], [E, H]) with `block` None, or per (rows, columns) block
    ([E, 2I / rows, H / columns], [E, H / rows, I / columns])."""

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int] | None


class Int4Experts(NamedTuple):
    """4-bit expert weights (uint8 [E, N, K / 2] as kernels/int4.py packs them; int8 [E, N, K] for a projection of
    GGUF's 5- to 8-bit blocks): scales and offsets per group of each projection's `group` columns [E, N, K / group]
    (offsets None: FP4 E2M1 codes, or bytes without offsets)."""

    w13_scales: torch.Tensor
    w13_offsets: torch.Tensor | None
    w13_group: int
    w2_scales: torch.Tensor
    w2_offsets: torch.Tensor | None
    w2_group: int


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, s_ptr, z_ptr, sorted_ptr, block_expert_ptr, N, K, num_pairs, top_k,
                     group, stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn,
                     GATED: tl.constexpr, WEIGHTED: tl.constexpr, A_PER_TOKEN: tl.constexpr, SCALES: tl.constexpr,
                     SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, CODE: tl.constexpr, OFFSET: tl.constexpr,
                     FINE: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """SCALES: 0, 16-bit weights; 1, FP8 with a scale per output row (s [E, rows]); 2, FP8 with a scale per
    SCALE_BN x SCALE_BK block (s [E, rows / SCALE_BN, K / SCALE_BK]); 3, 4-bit (b uint8 [E, rows, K / 2], or CODE
    bytes: int8 [E, rows, K]) with a scale (s) and (OFFSET) an offset (z) per `group` columns [E, rows, K / group]."""
    await_inputs(PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok_m = pairs < num_pairs
    rows = pairs // top_k if A_PER_TOKEN else pairs  # gate-up reads the token's row; down reads the pair's
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b_ptrs = b_base + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    z_base = z_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:  # the up rows sit N rows below the gate rows in the stacked weight
        up_ptrs = b_ptrs + N * stride_bn
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok_k = rk < K - k0
        a = tl.load(a_ptrs, mask=ok_m[:, None] & ok_k[None, :], other=0.0)
        if SCALES == 3:  # K is a multiple of BLOCK_K, which divides the group or is a multiple of it
            b = tl.trans(dequant_tile(b_base, s_base, z_base, rn, ok_n, k0, group, stride_bn, stride_sn, a.dtype, CODE,
                                      OFFSET, FINE, BLOCK_N, BLOCK_K))
        else:
            b = tl.load(b_ptrs, mask=ok_k[:, None] & ok_n[None, :], other=0.0).to(a.dtype)  # FP8 widens exactly
        if SCALES == 2:  # this K tile lies in one block column: its product takes the blocks' scales
            sb = s_base + (k0 // SCALE_BK)
            acc += tl.dot(a, b, input_precision=PRECISION) * tl.load(sb + (rn // SCALE_BN) * stride_sn, mask=ok_n, other=0.0)[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            if SCALES == 3:
                u = tl.trans(dequant_tile(b_base, s_base, z_base, N + rn, ok_n, k0, group, stride_bn, stride_sn, a.dtype,
                                          CODE, OFFSET, FINE, BLOCK_N, BLOCK_K))
            else:
                u = tl.load(up_ptrs, mask=ok_k[:, None] & ok_n[None, :], other=0.0).to(a.dtype)
            if SCALES == 2:
                acc_up += tl.dot(a, u, input_precision=PRECISION) * tl.load(
                    sb + ((N + rn) // SCALE_BN) * stride_sn, mask=ok_n, other=0.0)[None, :]
            else:
                acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
            up_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SCALES == 1:
        acc = acc * tl.load(s_base + rn, mask=ok_n, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(s_base + N + rn, mask=ok_n, other=0.0)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(w_ptr + pairs, mask=ok_m, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok_m[:, None] & ok_n[None, :])


# (one_token: a key of the autotuner alone, below)
@triton.jit(do_not_specialize=["eps", "one_token"])
def _moe_gemv_kernel(x_ptr, w_ptr, ws_ptr, wo_ptr, ids_ptr, rw_ptr, nw_ptr, y_ptr, part_ptr, count_ptr, N, K,
                     num_experts, pairs_per_row, x_div, eps, one_token, stride_x, stride_y, stride_we, stride_w,
                     stride_wse, stride_ws, DOWN: tl.constexpr, NORM: tl.constexpr, NORM_ON_W: tl.constexpr,
                     SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    """Output row `row`, columns of this program: the sum over its `pairs_per_row` pairs p of rw[p] (DOWN) times
    expert ids[p]'s weight rows times input row p // x_div (DOWN: silu(gate) * up of row p; NORM: RMSNorm of it with
    weight nw, applied as the dense GEMV's prologue applies it). SCALE as kernels/matvec.py's weight_tile reads it. A
    pair whose id is outside [0, num_experts) adds nothing. SPLIT_K: the (pair, K tile) steps of a row in slices, the
    grid's third axis, summed in order by each tile's last (matvec.finish_slices); one token's steps only
    (_one_token_slices): there the down projection is one row of few tiles, which the slices spread over more SMs."""
    await_inputs(PDL)
    pid, row, k_part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    # One loop over (pair, K tile), not a loop over K in a loop over pairs: the weight loads stay pipelined across
    # the pairs' borders. The down projection's K (768 for Qwen3-30B-A3B) is a few tiles, and with a pipeline
    # restarted at every pair it took 14.1 us a layer where this loop takes 8.8 (H100, scripts/pdl_probe.py).
    tiles = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)  # (NORM: one pair a row)
    steps = pairs_per_row * tiles
    i_lo, i_hi = 0, steps
    if SPLIT_K > 1:
        i_lo, i_hi = k_part * steps // SPLIT_K, (k_part + 1) * steps // SPLIT_K
    for i in range(i_lo, i_hi):
        j = i // tiles
        k0 = (i - j * tiles) * BLOCK_K
        p = row * pairs_per_row + j
        e = tl.load(ids_ptr + p)
        mine = (e >= 0) & (e < num_experts)
        ok = tl.where(mine, n_ok, False)  # another rank's expert: no weight byte is read
        e = tl.where(mine, e, 0).to(tl.int64)
        x_row = x_ptr + (p // x_div).to(tl.int64) * stride_x
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if DOWN:
            gate = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = gate * tl.sigmoid(gate) * tl.load(x_row + K + ks, mask=k_ok, other=0.0).to(tl.float32)
        else:
            a = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:  # W @ (w_norm * x), scaled by 1 / rms(x) at the end
                sq += a * a
                nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                if not NORM_ON_W:
                    a = a * nw
        s_base = ws_ptr + e * stride_wse
        w = weight_tile(w_ptr + e * stride_we, s_base, wo_ptr + e * stride_wse, ns, ok, k0, K, stride_w, stride_ws,
                        x_ptr.dtype.element_ty, SCALE, SCALE_BN, SCALE_BK, BLOCK_N, BLOCK_K)
        if NORM_ON_W:  # (fp16: as the dense GEMV, kernels/matvec.py)
            w = w * nw[None, :]
        if SCALE == 1:  # (each pair's expert has its own row scales)
            w = w * tl.load(s_base + ns, mask=ok, other=0.0)[:, None]
        a = a.to(x_ptr.dtype.element_ty).to(tl.float32)
        if DOWN:
            a = a * tl.load(rw_ptr + p)
        acc += w * a[None, :]
    row_tiles = tl.num_programs(0)  # (a row's slices: its own workspace and counts, finish_slices' layout)
    y, sq, last = finish_slices(tl.sum(acc, 1), tl.sum(tl.reshape(sq, [1, BLOCK_K]), 1),
                                part_ptr + row.to(tl.int64) * SPLIT_K * (N + row_tiles), count_ptr + row * row_tiles,
                                ns, n_ok, N, pid, k_part, SPLIT_K)
    if last:
        if NORM:
            y *= tl.math.rsqrt(sq / K + eps)
        tl.store(y_ptr + row.to(tl.int64) * stride_y + ns, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _one_token_slices(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """K in slices for one token's step only (one_token is in the tuning key; a step of more tokens has programs
    enough, and its rows' workspace and counts would grow with it), where its counts (one a row and tile) fit."""
    rows = named_args["ids_ptr"].numel() // named_args["pairs_per_row"]
    return [c for c in configs if c.kwargs["SPLIT_K"] == 1 or (
        named_args["one_token"] and rows * cdiv(named_args["N"], c.kwargs["BLOCK_N"]) <= COUNTS)]


# Tuned once per projection shape, weight form and one token or more, at the first call (the engine warms up each graph
# size before capturing it): the grid grows with the pairs, and a tile chosen at the largest graph size of a few tokens
# (warmed first) left most SMs idle at batch-1 decode's one token.
_moe_gemv = (_moe_gemv_kernel if INTERPRET
             else triton.autotune(ONE_ROW_CONFIGS, key=["N", "K", "SCALE", "DOWN", "NORM", "one_token"],
                                  prune_configs_by={"early_config_prune": _one_token_slices})(_moe_gemv_kernel))


def grouped_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, quant: Fp8Experts | Int4Experts | None = None,
                 norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """fused_moe for steps of a few tokens, as two GEMVs over the selected experts' weights alone: gate-up, one
    program per (pair, BLOCK_N rows of the expert's [gate | up]) into [pairs, 2I]; then down, one program per
    (token, BLOCK_N outputs) that walks the token's k experts, applies silu(gate) * up as it loads the input (the
    dense GEMV's prologue) and sums the k weighted rows in float32. Every program streams whole weight rows along K
    (coalesced), as the dense GEMV does: at one token the GEMM's tiles left most SMs idle. Each pair reads its
    expert's rows: an expert two tokens share is read twice (from L2 where it fits), which bounds where this pays.
    `norm` (weight, eps): x is not yet normalized; gate-up applies that RMSNorm as it loads x."""
    t, h = x.shape
    e, two_i = w13.shape[:2]
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    x = x.contiguous()
    mid = torch.empty((t * k, two_i), dtype=x.dtype, device=x.device)
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    for down, a, b, c, rows, per_row, x_div in ((False, x, w13, mid, t * k, 1, k), (True, mid, w2, out, t, k, 1)):
        kk = a.shape[1] // 2 if down else a.shape[1]
        s = z = block = None
        group = 0
        if isinstance(quant, Int4Experts):  # (4-bit codes without offsets: FP4)
            s, z = (quant.w2_scales, quant.w2_offsets) if down else (quant.w13_scales, quant.w13_offsets)
            group = quant.w2_group if down else quant.w13_group
        elif quant is not None:
            s, block = quant.w2_scale if down else quant.w13_scale, quant.block
        scale, sbn, sbk = weight_form(b, s, block, z, group, fp4=z is None)
        strides = (s.stride(0), s.stride(1)) if scale else (0, 0)
        s = x if s is None else s  # (unread where the weights have no such part)
        z = s if z is None else z
        n = b.shape[1]
        fold = norm is not None and not down
        # K in slices at one token only (_one_token_slices; the interpreter's fixed slices too): more tokens pass
        # placeholders for the workspace and counts their launches never touch
        fixed = dict(matvec.FIXED_SPLIT, **({"SPLIT_K": 1} if t > 1 and matvec.FIXED_SPLIT else {}))
        slices = slice_workspace(n, x.device, rows) if t == 1 else (c, c)
        _moe_gemv[lambda meta: (cdiv(n, meta["BLOCK_N"]), rows, meta["SPLIT_K"])](
            a, b, s, z, ids, weights, norm[0] if fold else a, c, *slices, n, kk, e, per_row, x_div,
            norm[1] if fold else 0.0, int(t == 1), a.stride(0), c.stride(0), b.stride(0), b.stride(1), *strides,
            DOWN=down, NORM=fold, NORM_ON_W=fold and x.dtype == torch.float16, SCALE=scale, SCALE_BN=sbn, SCALE_BK=sbk,
            **GEMV_FIXED, **fixed, **pdl(x))
    return out


def tiles_file(num_experts: int, inter: int, hidden: int, weights: str, device_name: str) -> str:
    """The tile table's file name for a layer of `num_experts` experts of width `inter` on `hidden` (one rank's
    share), `weights` (weights_kind: "bf16", "fp8", "fp8-block128", "int4", ...), on a GPU by its CUDA name."""
    return f"E={num_experts},N={inter},H={hidden},w={weights},device={device_name.replace(' ', '_')}.json"


@functools.cache
def _tuned(name: str, directory: str) -> dict[int, dict] | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        table = json.load(f)
    if table.get("triton") != triton.__version__:
        log.warning("MoE tiles in %s were tuned with Triton %s; this is %s: `slipstream tune moe` retunes them",
                    path, table.get("triton"), triton.__version__)
    return {int(t): tiles for t, tiles in table["tiles"].items()}


@functools.cache
def _untuned(name: str) -> None:
    log.warning("no tuned MoE tiles for this layer and GPU (%s): using the default heuristic; `slipstream tune moe "
                "--model CONFIG` measures them", name.removesuffix(".json"))


def default_tiles(pairs: int, elem_bytes: int, shared_memory: int) -> dict:
    """The heuristic for layers without a tuned table: short row blocks for the small steps of decode (less
    padding), square tiles for large steps (reuse)."""
    if pairs <= 64:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif pairs <= 1024:
        bm, bn, bk, warps, stages = 32, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 64, 128, 64, 8, 3
    # Each pipeline stage holds an A tile and two weight tiles (gate and up): fewer stages where they would not fit
    # in shared memory (float32 models, GPUs with less of it).
    per_stage = (bm * bk + 2 * bk * bn) * elem_bytes
    stages = max(1, min(stages, (shared_memory - 4096) // per_stage))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


GEMV_TOKENS = 64  # grouped_gemv reads an expert once per pair: past this many tokens it cannot win (nor is it tuned)


def gemv_pays(tokens: int, top_k: int, experts: int) -> bool:
    """The heuristic's choice of grouped_gemv over the grouped GEMMs: one token, or so few pairs (a quarter of the
    experts at most) that few experts are chosen twice, which the GEMV would read twice."""
    return tokens == 1 or (tokens <= GEMV_TOKENS and 4 * tokens * top_k <= experts)


def choose_tiles(tokens: int, top_k: int, experts: int, name: str, elem_bytes: int, shared_memory: int,
                 directory: str = TUNED_DIR) -> dict:
    """The tuned entry of the nearest token count measured for this layer (`name`: tiles_file): GEMM tiles, or
    {"GEMV": True} where grouped_gemv won (only up to GEMV_TOKENS tokens: past them, the nearest GEMM tiles); else
    the heuristic (said once per layer)."""
    table = _tuned(name, directory)
    if table and tokens > GEMV_TOKENS:
        table = {t: c for t, c in table.items() if not c.get("GEMV")}
    if not table:
        _untuned(name)
        return dict(GEMV=True) if gemv_pays(tokens, top_k, experts) else default_tiles(tokens * top_k, elem_bytes, shared_memory)
    return dict(table[min(table, key=lambda t: (abs(t - tokens), t))])


@functools.cache
def _layer_table(num_experts: int, inter: int, hidden: int, weights: str, device: torch.device) -> tuple[str, int]:
    """(tile table name, shared memory per block) of a layer on a device: looked up once, not at every eager step."""
    props = torch.cuda.get_device_properties(device)
    return tiles_file(num_experts, inter, hidden, weights, props.name), getattr(props, "shared_memory_per_block_optin", 96 << 10)


def _tiles(x: torch.Tensor, w13: torch.Tensor, top_k: int, weights: str) -> dict:
    e, two_i = w13.shape[:2]  # (4-bit experts: packed, two columns a byte)
    if INTERPRET:
        return dict(GEMV=True) if gemv_pays(x.shape[0], top_k, e) else dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    name, shared_memory = _layer_table(e, two_i // 2, x.shape[1], weights, x.device)
    return choose_tiles(x.shape[0], top_k, e, name, x.element_size(), shared_memory)


def layer_tiles(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                quant: Fp8Experts | Int4Experts | None = None) -> dict:
    """How fused_moe runs a step of x's tokens through these experts: {"GEMV": True} (grouped_gemv) or GEMM tiles."""
    return _tiles(x, w13, top_k, weights_kind(x, quant, w13, w2))


def weights_kind(x: torch.Tensor, quant: Fp8Experts | Int4Experts | None, w13: torch.Tensor, w2: torch.Tensor) -> str:
    """How the experts' weights are stored, as tile tables name it."""
    if quant is None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, "fp32")
    if isinstance(quant, Int4Experts):  # (bytes: "int8", tiles of their own)
        return "int8" if w13.dtype == torch.int8 or w2.dtype == torch.int8 else "int4" if quant.w13_offsets is not None else "fp4"
    return "fp8" if quant.block is None else f"fp8-block{quant.block[1]}"


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, skipped_pairs: bool = False, quant: Fp8Experts | Int4Experts | None = None,
              tiles: dict | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """sum over the k selected experts e of w_e * down_e(silu(gate_e x) * up_e x), for x [T, H], w13 [E, 2I, H]
    (gate rows then up rows), w2 [E, H, I], topk_weights / topk_ids [T, k]. `skipped_pairs`: some ids are outside
    [0, E) (another rank's experts); those pairs add nothing. `quant`: the weights are FP8 or 4-bit (w13 [E, 2I,
    H / 2] and w2 [E, H, I / 2] packed), with these scales. `tiles`: these (tuning), instead of the layer's tuned
    ones; {"GEMV": True} runs grouped_gemv. `norm` (weight, eps), grouped_gemv only: x is not yet normalized."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    inter, k = two_i // 2, topk_ids.shape[1]
    pairs = t * k
    if t == 0:  # (no launch: an autotuner's first call would time empty grids and keep what it picked)
        return x.new_empty((0, h))
    tiles = dict(tiles) if tiles is not None else layer_tiles(x, w13, w2, k, quant)
    if tiles.get("GEMV"):
        if t > GEMV_TOKENS:
            raise ValueError(f"the grouped GEMV runs steps of at most {GEMV_TOKENS} tokens, not {t}")
        return grouped_gemv(x, w13, w2, topk_weights, topk_ids, quant, norm)
    if norm is not None:
        raise ValueError("fused_moe applies a norm in the grouped GEMV only: normalize x before the grouped GEMMs")
    s13 = s2 = z13 = z2 = x  # (unread where the weights have no such part)
    g13 = g2 = 1
    sbn, sbk = 1, 1
    if isinstance(quant, Int4Experts):
        mode = 3
        s13, s2, g13, g2 = quant.w13_scales, quant.w2_scales, quant.w13_group, quant.w2_group
        z13, z2 = quant.w13_offsets, quant.w2_offsets
    elif quant is not None:
        mode = 1 if quant.block is None else 2
        s13, s2 = quant.w13_scale, quant.w2_scale
        sbn, sbk = quant.block or (1, 1)
    else:
        mode = 0
    if mode == 2:  # a K tile must not straddle two scale blocks; the up rows start on a block
        tiles["BLOCK_K"] = min(tiles["BLOCK_K"], sbk)
        if sbk % tiles["BLOCK_K"] or inter % sbn:
            raise ValueError(f"FP8 expert blocks of {sbn} x {sbk}: the expert width {inter} must be a multiple of "
                             f"{sbn} and the block width a multiple of {tiles['BLOCK_K']}")
    bm = tiles["BLOCK_M"]
    sorted_ids, block_expert = align_by_expert(topk_ids, e, bm)
    x = x.contiguous()
    mid = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    # rows of skipped pairs are never written: zeros, so that the sum over a token's k rows leaves them out
    out = (torch.zeros if skipped_pairs else torch.empty)((pairs, h), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    precision = dot_precision(x.dtype)
    for a, b, c, s, z, group, n, kk, gated in ((x, w13, mid, s13, z13, g13, inter, h, True),
                                               (mid, w2, out, s2, z2, g2, h, inter, False)):
        # each projection's own form: bytes (GGUF's 5- to 8-bit blocks), FP4 nibbles (no offsets) or integer nibbles
        code = CODE_S8 if b.dtype == torch.int8 else CODE_FP4 if z is None else CODE_U4
        offset = mode == 3 and z is not None
        z = z if offset else s
        step = dict(tiles)
        if mode == 3:  # each K tile inside one group, or spanning whole ones
            step["BLOCK_K"] = min(step["BLOCK_K"], block_k(kk, group))
        strides = (s.stride(0), s.stride(1)) if mode else (0, 0)
        _moe_gemm_kernel[(block_expert.numel(), cdiv(n, step["BLOCK_N"]))](
            a, b, c, weights, s, z, sorted_ids, block_expert, n, kk, pairs, k if gated else 1, group,
            a.stride(0), b.stride(0), b.stride(1), c.stride(0), *strides,
            GATED=gated, WEIGHTED=not gated, A_PER_TOKEN=gated, SCALES=mode, SCALE_BN=sbn, SCALE_BK=sbk, CODE=code,
            OFFSET=offset,
            FINE=mode == 3 and fine_groups(step["BLOCK_K"], group), PRECISION=precision, **step, **pdl(x))
    return out.view(t, k, h).sum(1)
