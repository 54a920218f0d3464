"""GEMV y = f(x) @ W^T for one row x (batch-1 decode) or a few (a verifying step's 1 + k, a small batch), with the
elementwise op f before the projection fused in.

At batch 1 a projection is one pass over its weight: its time is W's bytes over HBM bandwidth. cuBLAS picks
split-K kernels for the narrow projections that leave bandwidth unused and add a reduction launch, and the norm
and activation before each projection are launches of their own. Here each program streams BLOCK_N rows of W
in [BLOCK_N, BLOCK_K] tiles (contiguous along K, so every load is coalesced) and builds the matching chunk of
f(x) on the fly:
  - "rmsnorm":  f(x) = rms_norm(x + residual) * w_norm. RMSNorm is a per-row scale, so the program accumulates
                W @ (w_norm * (x + residual)) and the sum of squares in the same pass and scales at the end:
                one pass over x, no serial pre-pass. The program owning the first rows also writes
                x + residual, the next block's residual;
  - "silu_mul": f([gate | up]) = silu(gate) * up, the SwiGLU before the down projection;
  - "none":     f(x) = x.
x is re-read by every program, but it is a few KB and stays in L2. One row may also cut K into slices
(kernels/_slices.py: summed in slice order by each tile's last, the RMSNorm's sums of squares with them), so that a
narrow projection's programs are enough to keep loads in flight on every SM; the autotuner picks. Up to GEMV_ROWS
rows run through the tensor cores, 16 rows at once, each weight tile loaded once for all of them, so that a few rows
stream the weight once as one row does (with cuBLAS and the unfused ops, a batch-1 verifying step of k + 1 rows cost 6.8 ms where a plain
decode step cost 5.9: H100, Llama-3.1-8B shape, lease AK); the layers send it up to LAYER_GEMV_ROWS rows, one until a
GPU has measured where this form beats cuBLAS. What meets W is rounded to x's dtype, as the unfused
kernels round their outputs (for "rmsnorm" that is w_norm * (x + residual), before the 1/rms scale; in fp16, whose
65504 that product can pass where the normalized input would not, w_norm multiplies the weight tile instead: NORM_ON_W).
FP8 weights come with scales: one per output row (applied to the row's sum) or one per block of rows x columns
(applied to each weight as it is loaded; the scale tile is a few hundred bytes and stays in L1). 4-bit weights
(layers/quantization/int4.py: bytes of two columns, a scale and an offset per group of a row) and 8-bit integer
weights (GGUF 5-, 6- and 8-bit blocks: a signed byte a column, a scale and maybe an offset per group): one row runs
_gemv_int4_kernel (4-bit integers, read as int32 words of 8 columns: for 16-bit x, the nibbles meet f(x) in
half-precision pairs, each word's products summed in half precision) or _gemv_grouped_kernel (FP4, 8-bit), which
apply each group's scale (and offset) to the group's sums, kept in float32 (one row's sums differ from the GEMM's of
several rows in the last bits); a few rows unpack and dequantize each weight as it loads, rounded to x's dtype as the
W4A16 GEMM rounds them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import GEMV_ROWS, INTERPRET, cdiv, dot_precision
from slipstream.kernels._pdl import await_inputs, first_wave, pdl, prefetch_weights
from slipstream.kernels._slices import COUNTS, arrive, leave, slice_sum, tile_counts
from slipstream.kernels.int4 import e2m1, half_pairs, one_plus_sixteenth, word_dot_f16

_PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}

CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(2, 1024, 4, 4), (4, 512, 4, 4), (4, 1024, 8, 3), (8, 256, 4, 4), (8, 512, 4, 3),
                         (8, 512, 8, 4), (16, 256, 4, 4), (16, 256, 8, 3), (16, 512, 8, 2), (32, 128, 4, 4),
                         # FP8 weights: half the bytes per column, so wider K tiles keep as many loads in flight
                         (4, 2048, 8, 3), (8, 1024, 8, 3), (16, 1024, 8, 3), (32, 512, 8, 3)]
]
# A few rows (a verifying step's 1 + k, a small batch's decode): the rows go through the tensor cores, 16 at a time
# (their smallest tile), each weight tile loaded once for all of them; columns in tiles of at least 16 (the dot's).
ROW_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (32, 512, 8, 3),
                         (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3)]
]


@triton.jit
def weight_tile(w_ptr, ws_ptr, wo_ptr, ns, n_ok, k0, K, stride_w, stride_ws, dtype: tl.constexpr,
                SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows `ns` (`n_ok`: in range), columns k0 .. k0 + BLOCK_K (those below K) of a weight as float32 [BLOCK_N, BLOCK_K], its block
    scales applied (SCALE 2), 4- and 8-bit weights dequantized and rounded to `dtype`; a scale per row (SCALE 1) is
    the caller's to apply (the dense GEMV to the row's sum, the grouped one to each tile: its rows change expert).
    SCALE: 0 none, 1 one per output row, 2 one per SCALE_BN x SCALE_BK block, 3 4-bit weights with a scale and an
    offset per SCALE_BK columns of a row, 4 FP4 E2M1 weights with a scale per SCALE_BK columns of a row, 5 8-bit integer
    weights with a scale per SCALE_BK columns of a row, 6 the same with an offset too."""
    ks = k0 + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (ks < K)[None, :]
    if SCALE >= 3:
        if SCALE >= 5:
            v = tl.load(w_ptr + ns[:, None] * stride_w + ks[None, :], mask=ok, other=0).to(tl.float32)
        else:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + ns[:, None] * stride_w + kb[None, :], mask=n_ok[:, None] & (kb < K // 2)[None, :], other=0)
            q = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K])
            v = e2m1(q) if SCALE == 4 else q.to(tl.float32)
        group = ns[:, None] * stride_ws + (ks // SCALE_BK)[None, :]
        w = v * tl.load(ws_ptr + group, mask=ok, other=0.0).to(tl.float32)
        if SCALE == 3 or SCALE == 6:
            w += tl.load(wo_ptr + group, mask=ok, other=0.0).to(tl.float32)
        w = w.to(dtype).to(tl.float32)
    else:
        w = tl.load(w_ptr + ns[:, None] * stride_w + ks[None, :], mask=ok, other=0.0).to(tl.float32)
    if SCALE == 2:
        w *= tl.load(ws_ptr + (ns // SCALE_BN)[:, None] * stride_ws + (ks // SCALE_BK)[None, :], mask=ok, other=0.0)
    return w


@triton.jit
def gemv_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, at, ks, ok, K, write_res, sq, PROLOGUE: tl.constexpr,
               HAS_RES: tl.constexpr, APPLY_NORM: tl.constexpr):
    """f(x) in float32 at offsets `at` of x (columns `ks`, both of any one shape; `ok`: in range), and the sum of
    squares `sq` grown by x + residual's squares there ("rmsnorm", whose 1/rms scale the caller applies to its sums):
    SwiGLU of [gate | up] ("silu_mul", gate at `at`, up K further), or x (+ residual, written to res_out where
    `write_res`) times the norm weight (where APPLY_NORM)."""
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        a = gate * tl.sigmoid(gate) * tl.load(x_ptr + K + at, mask=ok, other=0.0).to(tl.float32)
    else:
        a = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            a += tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
            if write_res:
                tl.store(res_out_ptr + at, a.to(res_out_ptr.dtype.element_ty), mask=ok)
        if PROLOGUE == 1:
            sq += a * a
            if APPLY_NORM:
                a = a * tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    return a, sq


@triton.jit
def k_slice(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(tile of output rows, slice, its first column, its end column) of this program of a one-row GEMV whose grid is
    SPLIT_K slices of K (whole BLOCK_K tiles, the last slice ending at K) times cdiv(N, BLOCK_N) row tiles, the tiles
    first: the programs placed first (the first wave, which prefetches) are the slices that start at column 0."""
    pid = tl.program_id(0)
    if SPLIT_K == 1:  # (the loop from 0: its columns' alignment stays known to the compiler)
        return pid, 0, 0, K
    tiles = tl.num_programs(0) // SPLIT_K
    tile, part = pid % tiles, pid // tiles
    steps = tl.cdiv(K, BLOCK_K)
    return tile, part, part * steps // SPLIT_K * BLOCK_K, tl.minimum((part + 1) * steps // SPLIT_K * BLOCK_K, K)


@triton.jit
def finish_slices(y, sq, part_ptr, count_ptr, ns, n_ok, N, tile, part, SPLIT_K: tl.constexpr):
    """A one-row GEMV's row sums `y` [BLOCK_N] and its sum of squares `sq` ([1]; the RMSNorm prologue's) over this
    program's slice of K -> (every slice's, summed in slice order; whether this program finishes the tile). The
    workspace holds a slice's sums at [slice, row] and its sums of squares at [slice, N + tile]."""
    if SPLIT_K == 1:
        return y, sq, True
    stride = N + tl.cdiv(N, ns.shape[0])
    one = tl.arange(0, 1)
    tl.store(part_ptr + part * stride + ns, y, mask=n_ok)
    tl.store(part_ptr + part * stride + N + tile + one, sq)
    last = arrive(count_ptr + tile, SPLIT_K)
    if last:
        y = slice_sum(part_ptr, ns, n_ok, stride, y, SPLIT_K)
        sq = slice_sum(part_ptr, N + tile + one, one < 1, stride, sq, SPLIT_K)
        leave(count_ptr + tile)
    return y, sq, last


# (M: one compiled variant for every row count, rather than another for a multiple of 16 met after warm-up)
@triton.jit(do_not_specialize=["eps", "M"])
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, b_ptr, y_ptr, res_out_ptr, part_ptr, count_ptr, M, N,
                 K, eps, stride_w, stride_ws, wave, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
                 PRECISION: tl.constexpr, NORM_ON_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    # SCALE: as weight_tile reads it. BLOCK_M: 1 (one row: products summed elementwise) or at least 16 (up to
    # BLOCK_M rows through the tensor cores); x, the residual and y are contiguous [M, K or 2K or N]. SPLIT_K: slices
    # of K (one row only), summed in order by each tile's last (finish_slices).
    pid, k_part, k_lo, k_hi = k_slice(K, BLOCK_K, SPLIT_K)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    PACKED: tl.constexpr = SCALE == 3 or SCALE == 4  # two columns a byte
    prefetch_weights(w_ptr + (k_lo // 2 if PACKED else k_lo), ns, N, stride_w, (K - k_lo) // 2 if PACKED else K - k_lo,
                     wave, BLOCK_K // 2 if PACKED else BLOCK_K, PDL)
    await_inputs(PDL)
    tl.static_assert(BLOCK_M == 1 or SPLIT_K == 1, "K is cut into slices for one row only")
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    if BLOCK_M == 1:  # products accumulate elementwise and are reduced across K once at the end, not every tile
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    width = 2 * K if PROLOGUE == 2 else K  # of a row of x
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = m_ok[:, None] & (ks < K)[None, :]
        a, sq = gemv_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, ms[:, None] * width + ks[None, :], ks[None, :], ok, K,
                           pid == 0, sq, PROLOGUE, HAS_RES, not NORM_ON_W)
        if NORM_ON_W:
            nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        w = weight_tile(w_ptr, ws_ptr, wo_ptr, ns, n_ok, k0, K, stride_w, stride_ws, x_ptr.dtype.element_ty,
                        SCALE, SCALE_BN, SCALE_BK, BLOCK_N, BLOCK_K)
        if NORM_ON_W:
            w = w * nw[None, :]
        a = a.to(x_ptr.dtype.element_ty)
        if BLOCK_M == 1:
            acc += w * a.to(tl.float32)
        else:
            acc = tl.dot(a, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=PRECISION)
    sq = tl.sum(sq, 1)
    if BLOCK_M == 1:
        y, sq, last = finish_slices(tl.sum(acc, 1), sq, part_ptr, count_ptr, ns, n_ok, N, pid, k_part, SPLIT_K)
        y = y[None, :]
    else:
        y, last = acc, True
    if last:
        if SCALE == 1:
            y *= tl.load(ws_ptr + ns, mask=n_ok, other=0.0)[None, :]
        if PROLOGUE == 1:
            y = y * tl.math.rsqrt(sq / K + eps)[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms[:, None] * N + ns[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["eps"])
def _gemv_int4_kernel(x_ptr, res_ptr, nw_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, res_out_ptr, part_ptr, count_ptr, N,
                      K, eps, stride_q, stride_s, wave, GROUP: tl.constexpr, PROLOGUE: tl.constexpr,
                      HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, SPAN: tl.constexpr, HALF2: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    """One row times 4-bit integer weights with a scale and an offset per GROUP columns (SCALE 3 as weight_tile
    reads them), read as int32 words of 8 columns. A tile is [BLOCK_N rows, BLOCK_K / SPAN spans, a span's words],
    each span of SPAN columns inside one group:
        y[n] = sum over spans of scale * sum(q f(x)) + offset * sum(f(x)).
    f(x) is built in float32 laid out [spans, words, 8] (once for all BLOCK_N rows) and meets the nibbles either in
    half-precision pairs (HALF2: 16-bit activations, word_dot_f16; f(x) scaled by 2^-8 on the way, so that a word's
    sums of products stay far below half precision's 65504 for any |f(x)| under 2^16, the scale given back with the
    group's; below 2^-6, f(x) loses bits as a half-precision subnormal, and below 2^-17 it is 0: under the RMSNorm
    prologue f(x) is not yet normalized, and in a CPU emulation of SmolLM2's first layer, where most of it lies
    below 2^-6, the error stayed under 0.4% of the output's RMS, under bf16's rounding of the output) or in float32,
    a nibble at a time (float32 activations), split into the 8 columns of each word in registers:
        sum(q f(x)) = 16 sum((1 + q / 16) f(x)) - 16 sum(f(x)).
    SPLIT_K: slices of K, summed in order by each tile's last (finish_slices)."""
    WORDS: tl.constexpr = SPAN // 8
    SPANS: tl.constexpr = BLOCK_K // SPAN
    pid, k_part, k_lo, k_hi = k_slice(K, BLOCK_K, SPLIT_K)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    prefetch_weights(q_ptr + k_lo // 2, ns, N, stride_q, (K - k_lo) // 2, wave, BLOCK_K // 2, PDL)
    await_inputs(PDL)
    span = tl.arange(0, SPANS)
    word_at = (span * WORDS)[:, None] + tl.arange(0, WORDS)[None, :]  # [SPANS, WORDS] from the tile's first word
    rows = q_ptr.to(tl.pointer_type(tl.int32)) + ns.to(tl.int64)[:, None, None] * (stride_q // 4)
    acc = tl.zeros([BLOCK_N, SPANS, WORDS], dtype=tl.float32)
    acc_offset = tl.zeros([BLOCK_N, SPANS], dtype=tl.float32)
    col_at = 8 * word_at[:, :, None] + tl.arange(0, 8)[None, None, :]  # [SPANS, WORDS, 8]
    sq = tl.zeros([SPANS, WORDS, 8], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        span_ok = k0 + span * SPAN < K
        w = tl.load(rows + (k0 // 8 + word_at)[None, :, :], mask=n_ok[:, None, None] & span_ok[None, :, None], other=0)
        cols = k0 + col_at
        a, sq = gemv_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, cols, cols, cols < K, K, pid == 0, sq, PROLOGUE,
                           HAS_RES, True)
        at = ns[:, None] * stride_s + ((k0 + span * SPAN) // GROUP)[None, :]
        s_ok = n_ok[:, None] & span_ok[None, :]
        scale = tl.load(s_ptr + at, mask=s_ok, other=0.0).to(tl.float32)
        a_word = tl.sum(a, 2)  # [SPANS, WORDS]
        acc_offset += tl.load(o_ptr + at, mask=s_ok, other=0.0).to(tl.float32) * tl.sum(a_word, 1)[None, :]
        if HALF2:
            x04, x15, x26, x37 = half_pairs(a * 0.00390625, SPANS, WORDS)
            part = word_dot_f16(w, x04[None, :, :], x15[None, :, :], x26[None, :, :], x37[None, :, :])
            acc += part * (256.0 * scale)[:, :, None]
        else:
            even, odd = tl.split(tl.reshape(a, [SPANS, WORDS, 4, 2]))  # columns 0, 2, 4, 6 and 1, 3, 5, 7 of a word
            a04, a26 = tl.split(tl.reshape(even, [SPANS, WORDS, 2, 2]))
            a15, a37 = tl.split(tl.reshape(odd, [SPANS, WORDS, 2, 2]))
            a0, a4 = tl.split(a04)
            a2, a6 = tl.split(a26)
            a1, a5 = tl.split(a15)
            a3, a7 = tl.split(a37)
            part = one_plus_sixteenth(w, 0) * a0[None, :, :]
            part += one_plus_sixteenth(w, 1) * a1[None, :, :]
            part += one_plus_sixteenth(w, 2) * a2[None, :, :]
            part += one_plus_sixteenth(w, 3) * a3[None, :, :]
            part += one_plus_sixteenth(w, 4) * a4[None, :, :]
            part += one_plus_sixteenth(w, 5) * a5[None, :, :]
            part += one_plus_sixteenth(w, 6) * a6[None, :, :]
            part += one_plus_sixteenth(w, 7) * a7[None, :, :]
            acc += (part - a_word[None, :, :]) * (16.0 * scale)[:, :, None]
    y, sq, last = finish_slices(tl.sum(tl.sum(acc, 2) + acc_offset, 1), tl.sum(tl.reshape(sq, [1, sq.numel]), 1),
                                part_ptr, count_ptr, ns, n_ok, N, pid, k_part, SPLIT_K)
    if last:
        if PROLOGUE == 1:
            y = y * tl.math.rsqrt(sq / K + eps)
        if HAS_BIAS:
            y += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + ns, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["eps"])
def _gemv_grouped_kernel(x_ptr, res_ptr, nw_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, res_out_ptr, N, K, eps, group,
                         stride_q, stride_s, wave, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SCALE: tl.constexpr, SPAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
    """One row times FP4 or 8-bit integer weights with a scale (and an offset) per group of columns (SCALE 4 to 6 as
    weight_tile reads them; 4-bit integers run _gemv_int4_kernel). A tile is [BLOCK_N rows, BLOCK_K / SPAN spans, a
    span's bytes], each span of SPAN columns inside one group, so a scale is loaded once a span and the sums go
        y[n] = sum over spans of scale * sum(q * f(x)) (+ offset * sum(f(x))):
    a value and a multiply-add a weight, where dequantizing each weight first costs a scale (and an offset) load,
    a multiply and an add; the bytes load up to 16 at a time (a span's, 8 for NVFP4's groups of 16). A byte's two
    FP4 nibbles (columns 2j, 2j + 1) are joined as a last axis of 2, which f(x) (built in float32: it does not meet
    tensor cores) is laid out to match."""
    PER: tl.constexpr = 2 if SCALE == 4 else 1  # columns a byte holds
    BYTES: tl.constexpr = SPAN // PER
    SPANS: tl.constexpr = BLOCK_K // SPAN
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    prefetch_weights(q_ptr, ns, N, stride_q, K // PER, wave, BLOCK_K // PER, PDL)
    await_inputs(PDL)
    span = tl.arange(0, SPANS)
    # a tile's bytes, contiguous along a row (so loaded 16 at a time), and the columns of x they meet: for nibbles
    # [SPANS, BYTES, 2] (low, high), for bytes [SPANS, BYTES]
    bs = tl.arange(0, BYTES)
    byte_at = ns.to(tl.int64)[:, None, None] * stride_q + (span * BYTES)[None, :, None] + bs[None, None, :]
    if PER == 2:
        col_at = (span * SPAN)[:, None, None] + (2 * bs)[None, :, None] + tl.arange(0, 2)[None, None, :]
    else:
        col_at = (span * SPAN)[:, None] + bs[None, :]
    acc = tl.zeros([BLOCK_N, SPANS], dtype=tl.float32)
    sq = tl.zeros(col_at.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + col_at
        ok = cols < K
        span_ok = k0 + span * SPAN < K
        q = tl.load(q_ptr + k0 // PER + byte_at, mask=n_ok[:, None, None] & span_ok[None, :, None], other=0)
        a, sq = gemv_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, cols, cols, ok, K, pid == 0, sq, PROLOGUE, HAS_RES,
                           True)
        if PER == 2:
            q = q.to(tl.int32)
            v = tl.join(e2m1(q & 15), e2m1(q >> 4))
            part = tl.sum(tl.sum(v * a[None, :, :, :], 3), 2)
            a_sum = tl.sum(tl.sum(a, 2), 1)
        else:
            part = tl.sum(q.to(tl.float32) * a[None, :, :], 2)
            a_sum = tl.sum(a, 1)
        at = ns[:, None] * stride_s + ((k0 + span * SPAN) // group)[None, :]
        s_ok = n_ok[:, None] & span_ok[None, :]
        acc += part * tl.load(s_ptr + at, mask=s_ok, other=0.0).to(tl.float32)
        if SCALE == 6:
            acc += tl.load(o_ptr + at, mask=s_ok, other=0.0).to(tl.float32) * a_sum[None, :]
    y = tl.sum(acc, 1)
    if PROLOGUE == 1:
        y = y * tl.math.rsqrt(tl.sum(tl.reshape(sq, [sq.numel]), 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + ns, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _sliced(configs: list[triton.Config], splits: list[tuple]) -> list[triton.Config]:
    """`configs` whole (SPLIT_K 1), and the (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K) tiles `splits` with K in slices."""
    return ([triton.Config({**c.kwargs, "SPLIT_K": 1}, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
            + [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
               for bn, bk, w, st, sk in splits])


def _counted(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Tiles whose slices' arrival counts fit the counts buffer (a vocabulary-wide head in narrow tiles does not)."""
    return [c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1 or cdiv(named_args["N"], c.kwargs["BLOCK_N"]) <= COUNTS]


# One row on 16-bit and FP8 weights, with K also in slices: the narrow projections' few programs left the loads in
# flight too few (Nsight Compute: under one wave an SM, docs/benchmarks.md); the autotuner picks.
ONE_ROW_CONFIGS = _sliced(CONFIGS, [(8, 1024, 8, 3, 2), (16, 512, 8, 2, 4), (16, 1024, 8, 3, 2)])
# Tuned once per weight shape, prologue and form, at the first call (the engine warms up before capturing graphs).
_KEY = ["N", "K", "PROLOGUE", "SCALE"]
_gemv = (_gemv_kernel if INTERPRET
         else triton.autotune(ONE_ROW_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _counted})(_gemv_kernel))
_gemv_rows = _gemv_kernel if INTERPRET else triton.autotune(_sliced(ROW_CONFIGS, []), key=_KEY)(_gemv_kernel)
FIXED = dict(BLOCK_N=8, BLOCK_K=64) if INTERPRET else {}  # small tiles make CPU tests cross tile borders
_FIXED_ROWS = dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1) if INTERPRET else {}
# The interpreter's slices of K for one row (tests set others)
FIXED_SPLIT = dict(SPLIT_K=2) if INTERPRET else {}
# One row on grouped small-integer weights: BLOCK_K columns (at least a span, SPAN <= 128), 4-bit bytes in flight per
# tile as the 16-bit configs' (4 to 16 KB)
GROUPED_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(8, 512, 4, 4), (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3),
                         (32, 256, 4, 4), (32, 256, 8, 3), (32, 512, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3),
                         (128, 128, 8, 3)]
]
_gemv_grouped = (_gemv_grouped_kernel if INTERPRET
                 else triton.autotune(GROUPED_CONFIGS, key=[*_KEY, "SPAN"])(_gemv_grouped_kernel))
# 4-bit words: also tiles of one, two and four warps with more weights a thread (f(x) reaches the words' layout through
# shared memory: a program of fewer warps waits at barriers for fewer), the fewest instructions a weight in their
# loops (scripts/sass_loop.py), and K in slices; the autotuner picks
INT4_CONFIGS = _sliced(GROUPED_CONFIGS + [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 256, 1, 4), (32, 128, 1, 4), (32, 256, 2, 4), (64, 128, 2, 4), (32, 512, 4, 3),
                         (64, 256, 2, 3)]
], [(16, 256, 1, 4, 4), (16, 512, 4, 3, 2), (32, 256, 2, 4, 2)])
_gemv_int4 = (_gemv_int4_kernel if INTERPRET
              else triton.autotune(INT4_CONFIGS, key=["N", "K", "PROLOGUE", "GROUP", "HALF2"],
                                   prune_configs_by={"early_config_prune": _counted})(_gemv_int4_kernel))
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in ONE_ROW_CONFIGS + INT4_CONFIGS)


def _sliced_grid(n: int):
    """A one-row GEMV's grid: its tiles of rows times its slices of K (k_slice)."""
    return lambda meta: (cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"],)


def slice_workspace(n: int, device: torch.device, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, arrival counts) of `rows` one-row GEMVs of `n` outputs each, for whichever tiles and slices they
    run with: a row's slices' float32 sums of its n outputs, then their sums of squares, one a tile (finish_slices),
    at most n."""
    splits = max(MAX_SPLIT_K, FIXED_SPLIT.get("SPLIT_K", 1))
    return torch.empty(rows * splits * 2 * n, dtype=torch.float32, device=device), tile_counts(device)


def span_of(group: int) -> int:
    """The columns a scale covers inside one K tile of the grouped GEMV: the largest power of two up to 128 that
    divides the group (the group itself, for the common 16 to 128)."""
    return math.gcd(group, 128)


def weight_form(weight: torch.Tensor, weight_scale: torch.Tensor | None, scale_block: tuple[int, int] | None,
                weight_offset: torch.Tensor | None, group: int, fp4: bool) -> tuple[int, int, int]:
    """(SCALE, SCALE_BN, SCALE_BK) as weight_tile reads a weight stored this way (gemv's arguments say how)."""
    if weight.dtype == torch.uint8:
        return (4 if fp4 else 3), 1, group
    if weight.dtype == torch.int8:
        return (5 if weight_offset is None else 6), 1, group
    if weight_scale is None:
        return 0, 1, 1
    return (1, 1, 1) if scale_block is None else (2, *scale_block)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 1e-6, weight_scale: torch.Tensor | None = None,
         scale_block: tuple[int, int] | None = None, weight_offset: torch.Tensor | None = None,
         group: int = 0, fp4: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """f(x) @ W.T (+ bias) for x of shape [M, K] ([M, 2K] for "silu_mul"), M at most GEMV_ROWS; returns (y, new
    residual or None).

    W = weight, or for FP8 weights weight * weight_scale: per output row ([N]), or per `scale_block` block; for
    4-bit weights (uint8 [N, K / 2]) unpack(weight) * weight_scale + weight_offset per `group` columns, or with `fp4`
    e2m1(unpack(weight)) * weight_scale; for 8-bit ones (int8 [N, K]) weight * weight_scale (+ weight_offset) per
    `group` columns.
    "rmsnorm" needs norm_weight; it returns x + residual as the new residual, or x itself without a residual."""
    n, k = weight.shape[0], weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    m = x.shape[0]
    if x.dim() != 2 or not 1 <= m <= GEMV_ROWS or x.shape[1] != (2 * k if prologue == "silu_mul" else k):
        raise ValueError(f"gemv takes 1 to {GEMV_ROWS} rows matching weight {tuple(weight.shape)} and prologue "
                         f"{prologue!r}, got {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = None
    if prologue == "rmsnorm":
        res_out = x if residual is None else torch.empty_like(x)
    scale, bn, bk = weight_form(weight, weight_scale, scale_block, weight_offset, group, fp4)
    if m == 1 and scale >= 3:
        span = span_of(group)
        if scale == 3:  # 4-bit integers, read as int32 words of 8 columns
            if span % 8:
                raise ValueError(f"the 4-bit GEMV reads int32 words of 8 columns: the group ({group}) must be a "
                                 "multiple of 8")
            if weight.data_ptr() % 4 or weight.stride(0) % 4:
                raise ValueError(f"the 4-bit GEMV reads int32 words: the weight's address and row stride "
                                 f"({weight.stride(0)} bytes) must be multiples of 4")
        io = (x, residual.contiguous() if residual is not None else x,
              norm_weight if norm_weight is not None else x, weight, weight_scale,
              weight_offset if weight_offset is not None else weight_scale, bias if bias is not None else x, y,
              res_out if res_out is not None else y)
        form = dict(PROLOGUE=_PROLOGUES[prologue], HAS_RES=residual is not None and prologue == "rmsnorm",
                    HAS_BIAS=bias is not None, SPAN=span,
                    **(dict(BLOCK_N=8, BLOCK_K=max(64, span)) if INTERPRET else {}))
        if scale == 3:  # 16-bit activations meet the nibbles in half-precision pairs
            _gemv_int4[_sliced_grid(n)](*io, *slice_workspace(n, x.device), n, k, eps, weight.stride(0),
                                        weight_scale.stride(0), first_wave(x), GROUP=group,
                                        HALF2=x.dtype != torch.float32, **form, **FIXED_SPLIT, **pdl(x))
        else:
            _gemv_grouped[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](
                *io, n, k, eps, group, weight.stride(0), weight_scale.stride(0), first_wave(x), SCALE=scale, **form,
                **pdl(x))
        return y, res_out
    kernel, tiles = ((_gemv, dict(BLOCK_M=1, **FIXED, **FIXED_SPLIT)) if m == 1
                     else (_gemv_rows, dict(BLOCK_M=16, **_FIXED_ROWS)))
    slices = slice_workspace(n, x.device) if m == 1 else (y, y)  # (a few rows never cut K: placeholders)
    kernel[_sliced_grid(n)](
        x, residual.contiguous() if residual is not None else x, norm_weight if norm_weight is not None else weight,
        weight, weight_scale if weight_scale is not None else x, weight_offset if weight_offset is not None else x,
        bias if bias is not None else x, y,
        res_out if res_out is not None else y, *slices, m, n, k, eps, weight.stride(0),
        weight_scale.stride(0) if weight_scale is not None else 0, first_wave(x),
        PROLOGUE=_PROLOGUES[prologue], HAS_RES=residual is not None and prologue == "rmsnorm", HAS_BIAS=bias is not None,
        SCALE=scale, SCALE_BN=bn, SCALE_BK=bk, PRECISION=dot_precision(x.dtype),
        NORM_ON_W=prologue == "rmsnorm" and x.dtype == torch.float16, **tiles, **pdl(x),
    )
    return y, res_out
