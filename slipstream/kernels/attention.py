"""Paged attention in Triton: varlen causal prefill with a cached prefix, and split-KV flash decoding.

Both read K/V straight from the paged pool `[num_pages, page_size, Hk, D]` through each sequence's block
table, so a chunked prefill or a prefix-cache hit attends over pages written by earlier steps or requests.

Prefill: on Hopper, bf16/fp16 prefills run the Gluon kernel of `attention_sm90` (FlashAttention-3's pipeline:
persistent, warp-specialized, wgmma). Elsewhere (and for fp32, or chunks of at most 64 tokens), the Triton kernel
below: one program per (query tile, sequence, query head). Query row i of a sequence with context length L
and q_len new tokens sits at position L - q_len + i and attends to keys 0..that position. Heavy tiles (late in
the sequence, more keys) are launched first for load balance. On Hopper, when a page holds whole key tiles
(page size a multiple of 64), each tile arrives by one bulk tensor copy (TMA) from a descriptor built on the
device; otherwise (and for 16-token pages) tokens are gathered through the block table one by one.

Decode: one query token per sequence. A program takes one KV head and all the query heads that share it (GQA
packing: the K/V tile is loaded once for the whole group, and the group forms the M side of a tensor-core dot),
over one partition of the context. Partitions are combined by a second kernel using each partition's
log-sum-exp, so long contexts spread over many SMs (flash decoding). The grid's partitions per sequence are fixed
by the batch (a CUDA graph is captured once for contexts up to max_model_len); each sequence cuts its own context
into that many on the device, so a short context under a graph sized for a long one still spreads over the SMs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET, cdiv, dot_precision, next_pow2
from slipstream.kernels._pdl import await_inputs, pdl

try:  # Gluon (Triton's tile-level dialect) carries the Hopper prefill kernel; older Tritons lack it
    from slipstream.kernels import attention_sm90
except ImportError:
    attention_sm90 = None

_LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(src, table, n0, ctx, kvh, stride_kp, stride_kt, stride_kh,
             HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Tokens n0..n0+BLOCK_N of one KV head's K or V, [BLOCK_N, HEAD_DIM], from `src`: the pool's pointer, or with
    TMA its tensor descriptor. With MASK, tokens from ctx on read 0."""
    toks = n0 + tl.arange(0, BLOCK_N)
    tok_ok = toks < ctx
    if TMA:  # the tile lies inside one page (PAGE % BLOCK_N == 0): one bulk tensor copy
        row = tl.load(table + n0 // PAGE) * PAGE + n0 % PAGE
        x = src.load([row.to(tl.int32), kvh * HEAD_DIM])  # the engine's lengths are int64; coordinates are i32
        if MASK:  # slots past the context were never written: zero them, as 0 * NaN would poison the output
            x = tl.where(tok_ok[:, None], x, 0.0)
    else:
        d = tl.arange(0, HEAD_DIM)
        if MASK:
            pages = tl.load(table + toks // PAGE, mask=tok_ok, other=0)
            off = pages * stride_kp + (toks % PAGE) * stride_kt + kvh * stride_kh
            x = tl.load(src + off[:, None] + d[None, :], mask=tok_ok[:, None], other=0.0)
        else:
            off = tl.load(table + toks // PAGE) * stride_kp + (toks % PAGE) * stride_kt + kvh * stride_kh
            x = tl.load(src + off[:, None] + d[None, :])
    return x


@triton.jit
def _kv_scales(src, table, n0, ctx, kvh, stride_sp, stride_st, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scales of tokens n0..n0+BLOCK_N of one KV head (an FP8 pool: [pages, PAGE, Hk] float32); 0 past ctx."""
    toks = n0 + tl.arange(0, BLOCK_N)
    tok_ok = toks < ctx
    pages = tl.load(table + toks // PAGE, mask=tok_ok, other=0)
    return tl.load(src + pages * stride_sp + (toks % PAGE) * stride_st + kvh, mask=tok_ok, other=0.0)


@triton.jit
def _attend(q, acc, m_i, l_i, k_src, v_src, ks_src, vs_src, table, n0, ctx, pos, kvh, scale_log2,
            stride_kp, stride_kt, stride_kh, stride_sp, stride_st, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
            BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
            SCALED: tl.constexpr, TREE: tl.constexpr = False, tree=0, prefix=0):
    """One key tile of online-softmax attention; MASK applies causality and the context end. SCALED: the pool holds
    FP8 keys and values with a float32 scale per token and head (k = k8 * ks): q.k = (q.k8) ks, and the value rows
    are dequantized in float32 before the P @ V dot (folding vs into p instead left fp16 weights subnormal).
    TREE (with MASK): `tree` holds each row's ancestor mask (runner/inputs.ancestor_masks: bit j = the step's row j
    of its sequence, the key at prefix + j), or -1 where the row is causal."""
    k = _kv_tile(k_src, table, n0, ctx, kvh, stride_kp, stride_kt, stride_kh, HEAD_DIM, PAGE, BLOCK_N, MASK, TMA)
    if SCALED:
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SCALED:
        s = s * _kv_scales(ks_src, table, n0, ctx, kvh, stride_sp, stride_st, PAGE, BLOCK_N)[None, :]
    if MASK:
        toks = n0 + tl.arange(0, BLOCK_N)
        seen = toks[None, :] <= pos[:, None]
        if TREE:
            j = tl.minimum(tl.maximum(toks - prefix, 0), 63).to(tl.int64)
            bit = ((tree[:, None] >> j[None, :]) & 1) != 0
            seen = seen & ((tree[:, None] < 0) | (toks < prefix)[None, :] | bit)
        s = tl.where(seen & (toks < ctx)[None, :], s, float("-inf"))
    # The scale folds into one multiply-add per score; the rescaled accumulator feeds the P @ V dot in place.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _kv_tile(v_src, table, n0, ctx, kvh, stride_kp, stride_kt, stride_kh, HEAD_DIM, PAGE, BLOCK_N, MASK, TMA)
    if SCALED:
        vs = _kv_scales(vs_src, table, n0, ctx, kvh, stride_sp, stride_st, PAGE, BLOCK_N)
        v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["max_q_len", "stride_bt", "first_seq", "num_slots"])  # vary every step: no recompiles
def _prefill_kernel(
    q_ptr, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, q_start, out_ptr, tree_ptr, scale_log2,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_sp, stride_st, stride_bt, stride_ot, stride_oh,
    max_q_len, first_seq, num_slots,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr, SCALED: tl.constexpr, TREE: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    tile = tl.cdiv(max_q_len, BLOCK_M) - 1 - tl.program_id(0)  # heavy (late) tiles first
    b = first_seq + tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(q_start + b)
    q_len = tl.load(q_start + b + 1) - q0
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(seq_lens + b)
    prefix = ctx - q_len
    kvh = h // GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    pos = prefix + rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + b * stride_bt
    if TMA:  # the pool seen as [slots, Hk * D] rows: a key tile is BLOCK_N consecutive rows of one page
        k_src = tl.make_tensor_descriptor(k_cache, [num_slots, stride_kt], [stride_kt, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_cache, [num_slots, stride_kt], [stride_kt, 1], [BLOCK_N, HEAD_DIM])
    else:
        k_src, v_src = k_cache, v_cache
    # Keys below the tile's first position are visible to every row: no mask. Then the diagonal band. (In a token
    # tree only the context before the step is: a row sees the step's rows that are its ancestors.)
    if TREE:  # (a sequence without a tree beside them, a prompt chunk, has -1 rows: causal, and the causal bound)
        tree = tl.load(tree_ptr + q0 + rows, mask=row_ok, other=-1)
        unmasked_end = (tl.where(tl.load(tree_ptr + q0) < 0, prefix + tile * BLOCK_M, prefix) // BLOCK_N) * BLOCK_N
    else:
        unmasked_end = ((prefix + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
        tree = 0
    hi = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_src, v_src, k_scales, v_scales, table, n0, ctx, pos, kvh, scale_log2,
                                stride_kp, stride_kt, stride_kh, stride_sp, stride_st, HEAD_DIM, PAGE, BLOCK_N, False,
                                PRECISION, TMA, SCALED)
    for n0 in range(unmasked_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_src, v_src, k_scales, v_scales, table, n0, ctx, pos, kvh, scale_log2,
                                stride_kp, stride_kt, stride_kh, stride_sp, stride_st, HEAD_DIM, PAGE, BLOCK_N, True,
                                PRECISION, TMA, SCALED, TREE, tree, prefix)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q0 + rows)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _partition(tokens, splits, PART_MIN: tl.constexpr, PART_STEP: tl.constexpr):
    """Context tokens per program when a sequence's `tokens` are cut into at most `splits` partitions: an even
    share rounded up to whole key tiles (PART_STEP), and at least PART_MIN, so that a short context takes a few
    programs of whole tiles rather than every program a sliver. The decode kernel and the reduction both use it."""
    return tl.maximum(tl.cdiv(tl.cdiv(tokens, splits), PART_STEP) * PART_STEP, PART_MIN)


# The partial-result strides scale with the number of partitions: like the per-step ints, never specialized on.
@triton.jit(do_not_specialize=["splits", "stride_bt", "stride_pb", "stride_ph", "stride_lb", "stride_lh", "split_base"])
def _decode_kernel(
    q_ptr, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, out_ptr, part_out, part_lse, shared_ptr,
    scale_log2, stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_sp, stride_st, stride_bt, stride_ob,
    stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    splits, split_base,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SHARED: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr,
    PART_MIN: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens + b)
    first = 0
    if SHARED:  # the shared prefix kernel covers [0, shared); this one the rest
        first = tl.load(shared_ptr)
    partition = _partition(ctx - first, splits, PART_MIN, BLOCK_N)
    start = first + split * partition
    if start >= ctx:
        return
    end = tl.minimum(start + partition, ctx)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables + b * stride_bt
    visible = tl.full([GROUP_PAD], end - 1, tl.int64)  # the query follows every context token
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_cache, v_cache, k_scales, v_scales, table, n0, end, visible, kvh,
                                scale_log2, stride_kp, stride_kt, stride_kh, stride_sp, stride_st, HEAD_DIM, PAGE,
                                BLOCK_N, True, PRECISION, False, SCALED)
    out = acc / l_i[:, None]
    if SPLIT:
        slot = split_base + split
        tl.store(part_out + b * stride_pb + heads[:, None] * stride_ph + slot * stride_ps + d[None, :], out, mask=g_ok[:, None])
        tl.store(part_lse + b * stride_lb + heads * stride_lh + slot, m_i + tl.math.log2(l_i), mask=g_ok)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit(do_not_specialize=["num_rows", "partition", "stride_pb", "stride_ph", "stride_lb", "stride_lh"])
def _shared_prefix_kernel(
    q_ptr, k_cache, v_cache, k_scales, v_scales, block_tables, shared_ptr, part_out, part_lse, scale_log2, num_rows,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_sp, stride_st, stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh, partition,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, SCALED: tl.constexpr,
    PDL: tl.constexpr,
):
    """Cascade attention: every decode's query heads of one KV head form the rows of one tile, attending to one
    partition of the prefix pages all sequences share (sequence 0's table), so those pages are read once per
    step instead of once per sequence."""
    await_inputs(PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    shared = tl.load(shared_ptr)
    start = split * partition
    if start >= shared:
        return
    end = tl.minimum(start + partition, shared)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # row r is query head kvh * GROUP + r % GROUP of sequence r // GROUP
    r_ok = r < num_rows
    b = r // GROUP
    h = kvh * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b[:, None] * stride_qb + h[:, None] * stride_qh + d[None, :], mask=r_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    visible = tl.full([BLOCK_M], end, tl.int64)  # every shared token precedes every query
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_cache, v_cache, k_scales, v_scales, block_tables, n0, end, visible,
                                kvh, scale_log2, stride_kp, stride_kt, stride_kh, stride_sp, stride_st, HEAD_DIM, PAGE,
                                BLOCK_N, True, PRECISION, False, SCALED)
    tl.store(part_out + b[:, None] * stride_pb + h[:, None] * stride_ph + split * stride_ps + d[None, :], acc / l_i[:, None],
             mask=r_ok[:, None])
    tl.store(part_lse + b * stride_lb + h * stride_lh + split, m_i + tl.math.log2(l_i), mask=r_ok)


@triton.jit
def _merge(part_out, part_lse, lo, hi, m, total, acc, b, h, d, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
           SPLIT_BLOCK: tl.constexpr):
    """Fold partitions lo..hi-1 of one (sequence, head) into a running (max, sum, weighted output)."""
    for s0 in range(lo, hi, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        s_ok = s < hi
        lse = tl.load(part_lse + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.math.exp2(lse - m_new)
        o = tl.load(part_out + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=s_ok[:, None], other=0.0)
        rescale = tl.math.exp2(m - m_new)
        acc = acc * rescale + tl.sum(o * w[:, None], 0)
        total = total * rescale + tl.sum(w, 0)
        m = m_new
    return m, total, acc


@triton.jit(do_not_specialize=["splits", "stride_pb", "stride_ph", "stride_lb", "stride_lh", "split_base",
                               "shared_partition"])
def _reduce_kernel(
    part_out, part_lse, seq_lens, shared_ptr, out_ptr, splits, split_base, shared_partition,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLIT_BLOCK: tl.constexpr, SHARED: tl.constexpr, PART_MIN: tl.constexpr,
    PART_STEP: tl.constexpr, PDL: tl.constexpr,
):
    await_inputs(PDL)
    # Partitions are merged SPLIT_BLOCK at a time with a running max, so the kernel does not depend on how many
    # there are (a constexpr split count would compile a new variant whenever contexts grew past a power of 2).
    # Slots [0, split_base) hold the shared-prefix partitions, the sequence's own follow from split_base.
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(seq_lens + b)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    if SHARED:
        shared = tl.load(shared_ptr)
        m, total, acc = _merge(part_out, part_lse, 0, tl.cdiv(shared, shared_partition), m, total, acc, b, h, d,
                               stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SPLIT_BLOCK)
        ctx -= shared
    used = tl.cdiv(ctx, _partition(ctx, splits, PART_MIN, PART_STEP))
    m, total, acc = _merge(part_out, part_lse, split_base, split_base + used, m, total, acc, b, h, d,
                           stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SPLIT_BLOCK)
    total = tl.where(total > 0, total, 1.0)  # a padded graph row has no context: write 0, not 0/0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, (acc / total).to(out_ptr.dtype.element_ty))


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[2]
    if hq % hk or d & (d - 1) or d < 16:
        raise ValueError(f"unsupported attention shape: {hq} query heads, {hk} kv heads, head_dim {d}")
    return hq, hk, d


def _scale_args(k_cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """(k scales, v scales, page stride, token stride) of an FP8 pool's scales [pages, page, Hk]; placeholders
    for a 16-bit pool."""
    if scales is None:
        return k_cache, k_cache, 0, 0
    ks, vs = scales
    if not (ks.is_contiguous() and vs.is_contiguous() and ks.shape == vs.shape == k_cache.shape[:3]):
        raise ValueError("an FP8 pool's scales must be contiguous [pages, page, Hk] tensors (the store kernel writes "
                         "them at slot * Hk + head)")
    return ks, vs, ks.stride(0), ks.stride(1)


def paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, max_query_len: int, scale: float, out: torch.Tensor | None = None, first_seq: int = 0,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, tree_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for the packed queries q [T, Hq, D] of sequences first_seq.. of the batch (the earlier
    ones are decodes handled elsewhere); `query_start_loc` holds row offsets into q. Pool slots past a context
    may be read and must hold finite values (the engine zero-fills its pool). `kv_scales`: the pool is FP8 with
    these per-token, per-head scales ([pages, page, Hk] float32 for K and for V). `tree_rows` [T] int64: token
    trees (AttentionMetadata.tree_rows): each row's ancestor mask, or -1 for a causal row."""
    hq, hk, d = _check(q, k_cache)
    out = torch.empty_like(q) if out is None else out
    if (attention_sm90 is not None and q.is_cuda and _capability(q.device) == 9 and kv_scales is None
            and tree_rows is None and attention_sm90.supported(q, k_cache, max_query_len)):
        _device_scratch()
        return attention_sm90.paged_prefill_sm90(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                 max_query_len, scale * _LOG2E, out, first_seq, _num_sms(q.device),
                                                 _l2_bytes(q.device))
    # Fixed tiles, no autotuning (which would tune on whatever prefill came first, often a short one). 128 x 64
    # tiles on one warpgroup leave room for two programs per SM, whose softmax and dots then overlap; short
    # chunks (after a cached prefix, in a busy mixed step) take 64-row tiles to waste fewer rows.
    block_m, block_n = (16, 16) if INTERPRET else (64 if max_query_len <= 64 else 128, 64)
    # (an FP8 pool's tiles take the pointer path: its scales are gathered beside them)
    tma = kv_scales is None and k_cache.shape[1] % block_n == 0 and _bulk_copies(k_cache) and _bulk_copies(v_cache)
    if tma:
        _device_scratch()
    ks, vs, stride_sp, stride_st = _scale_args(k_cache, kv_scales)
    _prefill_kernel[(cdiv(max_query_len, block_m), seq_lens.shape[0] - first_seq, hq)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, query_start_loc, out,
        tree_rows if tree_rows is not None else query_start_loc, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), stride_sp, stride_st,
        block_tables.stride(0), out.stride(0), out.stride(1), max_query_len, first_seq, k_cache.shape[0] * k_cache.shape[1],
        GROUP=hq // hk, HEAD_DIM=d, PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), TMA=tma, SCALED=kv_scales is not None, TREE=tree_rows is not None, num_warps=4,
        num_stages=1 if INTERPRET else 2 if tma else 3, **pdl(q),
    )
    return out


def _bulk_copies(cache: torch.Tensor) -> bool:
    """Whether key tiles can be fetched by Hopper's bulk tensor copies (TMA): a dense pool on an sm_90+ GPU (or
    the interpreter, which emulates them)."""
    dense = cache.is_contiguous() and (cache.stride(1) * cache.element_size()) % 16 == 0
    return dense and (INTERPRET or (cache.is_cuda and _capability(cache.device) >= 9))


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _device_scratch() -> None:
    """Tensor descriptors built inside a kernel live in global scratch memory, which Triton takes from the
    allocator set here: torch's, so it comes from the caching pool. Triton keeps the allocator in a context
    variable, which a new thread does not inherit, so it is set before every launch that needs it (a
    ContextVar.set, ~0.1 us): a server's engine loop on another thread than the warm-up once died of that."""
    triton.set_allocator(_scratch)


SHARED_PARTITION = 256  # shared-prefix tokens per cascade program


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


# The fewest context tokens a decode program takes (GPU; CPU tests cross partitions with fewer)
DECODE_PART_MIN = 16 if INTERPRET else 128


def decode_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int) -> int:
    """Partitions per sequence and KV head, the decode grid's third axis: enough programs to fill the GPU twice
    over, and no more than a context of `max_len` tokens fills with DECODE_PART_MIN each."""
    return max(1, min(cdiv(2 * num_sms, batch * num_kv_heads), cdiv(max_len, DECODE_PART_MIN)))


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    splits: int, scale: float, out: torch.Tensor | None = None,
    shared: torch.Tensor | None = None, shared_bound: int = 0, kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D]. `splits` (decode_splits picks it from a bound on the contexts): the
    partitions each sequence's context is cut into on the device, by its own length, at least DECODE_PART_MIN tokens
    each (programs past them return at once), so a CUDA graph captured with max_model_len serves any shorter context;
    1 runs no reduction.

    `shared` ([1] int, on the device): the first shared[0] context tokens of every sequence sit in the same
    pages, those of sequence 0's table (a prefix-cache hit common to the batch), shared[0] <= shared_bound.
    They are attended once for the whole batch by the cascade kernel; 0 turns that off at run time.
    `kv_scales`: an FP8 pool's per-token, per-head scales, as for `paged_prefill`."""
    hq, hk, d = _check(q, k_cache)
    bsz = q.shape[0]
    out = torch.empty_like(q) if out is None else out
    if splits < 1:
        raise ValueError(f"decode splits must be at least 1, got {splits}")
    group = hq // hk
    block_n = 16 if INTERPRET else 64
    # A big batch has programs enough to fill every SM many times over: 128-token tiles then amortize each
    # program's fixed costs. A small one streams faster with 64-token tiles, 3 stages deep, two programs per SM.
    # (H200, one partition per sequence: batch 256 x contexts 100-2048, 92% vs 88% of copy bandwidth; 64 x 4K, 85%
    # vs 98%.)
    big = not INTERPRET and bsz * hk >= 4 * _num_sms(q.device)
    common = dict(GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=d, PAGE=k_cache.shape[1],
                  BLOCK_N=128 if big else block_n, PRECISION=dot_precision(q.dtype), num_warps=4,
                  num_stages=1 if INTERPRET else 2 if big else 3)
    ks, vs, stride_sp, stride_st = _scale_args(k_cache, kv_scales)
    common.update(SCALED=kv_scales is not None, PART_MIN=DECODE_PART_MIN)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), stride_sp, stride_st,
               block_tables.stride(0), out.stride(0), out.stride(1))
    if splits == 1 and shared is None:
        _decode_kernel[(bsz, hk, 1)](q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, out, out, seq_lens,
                                     scale * _LOG2E, *strides, 0, 0, 0, 0, 0, 1, 0, SPLIT=False, SHARED=False,
                                     **common, **pdl(q))
        return out
    base = cdiv(shared_bound, SHARED_PARTITION) if shared is not None else 0
    part_out = torch.empty((bsz, hq, base + splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((bsz, hq, base + splits), dtype=torch.float32, device=q.device)
    pstr = (part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1))
    if shared is not None:
        block_m = 16 if INTERPRET else 64
        _shared_prefix_kernel[(cdiv(bsz * group, block_m), hk, base)](
            q, k_cache, v_cache, ks, vs, block_tables, shared, part_out, part_lse, scale * _LOG2E, bsz * group,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), stride_sp, stride_st,
            *pstr, SHARED_PARTITION, GROUP=group, HEAD_DIM=d, PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
            PRECISION=dot_precision(q.dtype), SCALED=kv_scales is not None, num_warps=4, num_stages=1 if INTERPRET else 3,
            **pdl(q),
        )
    flag = shared if shared is not None else seq_lens
    _decode_kernel[(bsz, hk, splits)](q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, part_out, part_lse, flag,
                                      scale * _LOG2E, *strides, *pstr, splits, base, SPLIT=True,
                                      SHARED=shared is not None, **common, **pdl(q))
    _reduce_kernel[(bsz, hq)](part_out, part_lse, seq_lens, flag, out, splits, base, SHARED_PARTITION, *pstr,
                              out.stride(0), out.stride(1), HEAD_DIM=d, SPLIT_BLOCK=16, SHARED=shared is not None,
                              PART_MIN=DECODE_PART_MIN, PART_STEP=common["BLOCK_N"], **pdl(q))
    return out
