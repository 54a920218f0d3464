"""Fused Mixture-of-Experts: tokens sorted by expert, then one grouped GEMM per projection.

Each of T tokens goes to k experts. `align_by_expert` lays the T * k (token, expert) pairs out expert by expert,
each expert's run padded to a multiple of BLOCK_M, in buffers whose size depends only on T, k and E, with no sort
and no host sync (so a CUDA graph can hold it): `sorted_ids` lists pair indices (pair = token * k + slot; padding holds T * k), and
`block_expert` names the expert of each BLOCK_M rows (-1 past the used blocks). The grouped GEMM then runs one
program per (BLOCK_M pairs, BLOCK_N outputs): it gathers its rows of A, streams only its expert's weight tile,
and scatters the result to the pairs' rows. Experts that received no pair own no block, so a batch-1 decode
step reads the weights of its k selected experts only.

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

from slipstream.kernels._device import INTERPRET, cdiv, dot_precision
from slipstream.kernels.int4 import CODE_FP4, CODE_S8, CODE_U4, block_k, dequant_tile, fine_groups

log = logging.getLogger(__name__)
# Tile tables `slipstream tune moe` measured, one file per GPU and layer shape (tiles_file names it):
# {"device": ..., "triton": ..., "tiles": {tokens: {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages}}}
TUNED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "moe")


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, pairs, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    n = tl.zeros([BLOCK], dtype=tl.int32)
    for p0 in range(0, pairs, BLOCK):
        ps = p0 + tl.arange(0, BLOCK)
        n += (tl.load(ids_ptr + ps, mask=ps < pairs, other=-1) == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(n, 0))


@triton.jit
def _place_kernel(ids_ptr, starts_ptr, counts_ptr, sorted_ptr, block_expert_ptr, pairs,
                  BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
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
    _count_kernel[(num_experts,)](flat, counts, pairs, BLOCK=1024)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = (torch.cumsum(padded, 0) - padded).to(torch.int32)
    capacity = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    block_expert = torch.full((capacity // block_m,), -1, dtype=torch.int32, device=flat.device)
    _place_kernel[(num_experts,)](flat, starts, counts, sorted_ids, block_expert, pairs, BLOCK_M=block_m, BLOCK=1024)
    return sorted_ids, block_expert


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
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """SCALES: 0, 16-bit weights; 1, FP8 with a scale per output row (s [E, rows]); 2, FP8 with a scale per
    SCALE_BN x SCALE_BK block (s [E, rows / SCALE_BN, K / SCALE_BK]); 3, 4-bit (b uint8 [E, rows, K / 2], or CODE
    bytes: int8 [E, rows, K]) with a scale (s) and (OFFSET) an offset (z) per `group` columns [E, rows, K / group]."""
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


def choose_tiles(tokens: int, pairs: int, name: str, elem_bytes: int, shared_memory: int,
                 directory: str = TUNED_DIR) -> dict:
    """The tuned tiles of the nearest token count measured for this layer (`name`: tiles_file), else the heuristic
    (said once per layer)."""
    table = _tuned(name, directory)
    if not table:
        _untuned(name)
        return default_tiles(pairs, elem_bytes, shared_memory)
    return dict(table[min(table, key=lambda t: (abs(t - tokens), t))])


@functools.cache
def _layer_table(num_experts: int, inter: int, hidden: int, weights: str, device: torch.device) -> tuple[str, int]:
    """(tile table name, shared memory per block) of a layer on a device: looked up once, not at every eager step."""
    props = torch.cuda.get_device_properties(device)
    return tiles_file(num_experts, inter, hidden, weights, props.name), getattr(props, "shared_memory_per_block_optin", 96 << 10)


def _tiles(x: torch.Tensor, w13: torch.Tensor, pairs: int, weights: str) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    e, two_i = w13.shape[:2]  # (4-bit experts: packed, two columns a byte)
    name, shared_memory = _layer_table(e, two_i // 2, x.shape[1], weights, x.device)
    return choose_tiles(x.shape[0], pairs, name, x.element_size(), shared_memory)


def weights_kind(x: torch.Tensor, quant: Fp8Experts | Int4Experts | None, w13: torch.Tensor, w2: torch.Tensor) -> str:
    """How the experts' weights are stored, as tile tables name it."""
    if quant is None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, "fp32")
    if isinstance(quant, Int4Experts):  # (bytes: "int8", tiles of their own)
        return "int8" if w13.dtype == torch.int8 or w2.dtype == torch.int8 else "int4" if quant.w13_offsets is not None else "fp4"
    return "fp8" if quant.block is None else f"fp8-block{quant.block[1]}"


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, skipped_pairs: bool = False, quant: Fp8Experts | Int4Experts | None = None,
              tiles: dict | None = None) -> torch.Tensor:
    """sum over the k selected experts e of w_e * down_e(silu(gate_e x) * up_e x), for x [T, H], w13 [E, 2I, H]
    (gate rows then up rows), w2 [E, H, I], topk_weights / topk_ids [T, k]. `skipped_pairs`: some ids are outside
    [0, E) (another rank's experts); those pairs add nothing. `quant`: the weights are FP8 or 4-bit (w13 [E, 2I,
    H / 2] and w2 [E, H, I / 2] packed), with these scales. `tiles`: these (tuning), instead of the layer's tuned
    ones."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    inter, k = two_i // 2, topk_ids.shape[1]
    pairs = t * k
    tiles = dict(tiles) if tiles is not None else _tiles(x, w13, pairs, weights_kind(x, quant, w13, w2))
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
            FINE=mode == 3 and fine_groups(step["BLOCK_K"], group), PRECISION=precision, **step)
    return out.view(t, k, h).sum(1)
