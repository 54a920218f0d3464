"""Paged prefill attention for Hopper (sm_90), written in Gluon: the FlashAttention-3 pipeline.

Same contract as `attention.paged_prefill`'s Triton kernel (varlen causal queries over a cached prefix, K/V read
from the paged pool through the block table), organised the way Hopper wants it:

- persistent: one program per SM walks the (query tile, sequence, head) work list, heaviest tiles first, so the
  loads of the next tile overlap the end of this one and the last wave is made of light tiles;
- warp specialization: a loader warpgroup, left with few registers, issues every Q, K and V load (TMA, K/V into
  a ring of shared-memory buffers, signalled by mbarriers), while two consumer warpgroups each own 64 of the
  tile's 128 query rows. Both consume the same K/V buffers, and the warp scheduler overlaps one warpgroup's
  softmax with the other's tensor-core work (forcing them to take turns, FA3's ping-pong, measured no faster);
- within a warpgroup, the scores of key tile j are computed (async wgmma) while P(j-1) @ V(j-1) is still
  queued, and tile j's softmax runs while that second product finishes, so the tensor cores are rarely idle;
- P stays in registers as the A operand of the P @ V product.

Key tiles that every row of a warpgroup sees whole skip the causal mask. Slots past the context in the last
tile are masked to -inf scores and P = 0 cancels their V rows, which must therefore be finite: the engine
zero-fills its pool, so a slot holds zeros or an earlier sequence's values.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from slipstream.kernels._device import cdiv

# Triton 3.6 calls the TMA load async_copy_global_to_shared; later releases renamed it async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

HALF_M = 64  # query rows per consumer warpgroup
BLOCK_N = 128  # keys per tile


@gluon.jit
def _softmax(s, m_i, l_i, n0, cols, pos, scale_log2, MASK: gl.constexpr):
    """Online-softmax update for one [HALF_M, BLOCK_N] score tile: the new max, P, the rescale factor and sum.
    Key n0 + c is visible to the row at position p when c <= p - n0."""
    if MASK:
        s = gl.where(gl.expand_dims(cols, 0) <= gl.expand_dims(pos - n0, 1), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * scale_log2)
    p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _step(j, ring, q_buf, bufs, p_prev, o, m_i, l_i, cols, pos, scale_log2, S_LAYOUT: gl.constexpr,
          MASK: gl.constexpr):
    """Key tile j (ring slot ring + j): S(j) = Q K(j)^T and O += P(j-1) V(j-1) both in flight; the softmax of
    S(j) runs under the second."""
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = bufs
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    ROWS: gl.constexpr = q_buf.shape[0]
    cur = ring + j
    stage = cur % STAGES
    prev = (cur - 1) % STAGES
    mbarrier.wait(k_ready.index(stage), (cur // STAGES) & 1)
    s_tok = warpgroup_mma(q_buf, k_smem.index(stage).permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, S_LAYOUT),
                          use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((cur - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_prev, v_smem.index(prev), o, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s_tok])
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, j * BLOCK_N, cols, pos, scale_log2, MASK)
    o = warpgroup_mma_wait(0, deps=[o_tok])
    mbarrier.arrive(v_empty.index(prev), count=1)
    o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout)), 1)
    return gl.convert_layout(p.to(p_prev.dtype), p_prev.type.layout), o, m_i, l_i


@gluon.jit
def _work(t, sched, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Work item t: query tile `tile` of sequence b, head h. Heads are taken a section at a time, a section
    being as many heads as keep their K/V in L2 together; within one, the heaviest tiles go first: the last
    query tile of every (sequence, head), then the ones before. Returns whether the tile holds queries, and
    its geometry."""
    seq_lens, q_start, first_seq, num_seqs, section, m_tiles = sched
    per_section = m_tiles * num_seqs * section
    rest = t % per_section
    rank = rest // (num_seqs * section)
    rest = rest % (num_seqs * section)
    b = first_seq + rest // section
    h = t // per_section * section + rest % section
    tile = m_tiles - 1 - rank
    q0 = gl.load(q_start + b).to(gl.int32)  # the engine's lengths are int64; TMA coordinates are i32
    q_len = gl.load(q_start + b + 1).to(gl.int32) - q0
    ctx = gl.load(seq_lens + b).to(gl.int32)
    pos0 = ctx - q_len + tile * BLOCK_M  # position of the tile's first query row
    n_tiles = gl.cdiv(gl.minimum(ctx, pos0 + BLOCK_M), BLOCK_N)
    return tile * BLOCK_M < q_len, b, h, q0 + tile * BLOCK_M, pos0, q_len - tile * BLOCK_M, ctx, n_tiles


@gluon.jit
def _consume(args, HALF: gl.constexpr):
    """One warpgroup: rows HALF * 64 .. +64 of each of the program's query tiles, against every key tile the
    loader brings."""
    sched, total, q_smem, bufs, q_ready, q_empty, out_ptr, stride_ot, stride_oh, num_groups, scale_log2 = args
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = bufs
    ROWS: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    STAGES: gl.constexpr = k_smem.shape[0]
    D: gl.constexpr = k_smem.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_buf = q_smem.index(HALF)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    ring = 0  # K/V tiles consumed so far: the ring slot and phase of the next
    done = 0  # query tiles done: the phase of the Q buffer
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        valid, b, h, row0, pos0, rows_left, ctx, n_tiles = _work(t, sched, 2 * ROWS, BLOCK_N)
        if valid:
            first = pos0 + HALF * ROWS  # position of this warpgroup's first query row
            pos = first + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            whole = gl.minimum((first + 1) // BLOCK_N, n_tiles)  # key tiles every row sees whole: no mask
            m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
            o = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
            mbarrier.wait(q_ready.index(HALF), done & 1)
            # Key tile 0 alone: its scores and softmax, nothing to add to O yet.
            stage = ring % STAGES
            mbarrier.wait(k_ready.index(stage), (ring // STAGES) & 1)
            s = warpgroup_mma(q_buf, k_smem.index(stage).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False)
            mbarrier.arrive(k_empty.index(stage), count=1)
            if whole > 0:
                p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, cols, pos, scale_log2, False)
            else:
                p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, cols, pos, scale_log2, True)
            p = gl.convert_layout(p.to(k_smem.dtype), p_layout)
            for j in range(1, whole):
                p, o, m_i, l_i = _step(j, ring, q_buf, bufs, p, o, m_i, l_i, cols, pos, scale_log2, s_layout, False)
            for j in range(gl.maximum(whole, 1), n_tiles):
                p, o, m_i, l_i = _step(j, ring, q_buf, bufs, p, o, m_i, l_i, cols, pos, scale_log2, s_layout, True)
            mbarrier.arrive(q_empty.index(HALF), count=1)  # every Q K^T product is done: the loader may refill Q
            last = ring + n_tiles - 1
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
            o = warpgroup_mma(p, v_smem.index(last % STAGES), o)
            mbarrier.arrive(v_empty.index(last % STAGES), count=1)

            o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
            r = HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            rows = (row0 + r).to(gl.int64) * stride_ot + h * stride_oh
            ptrs = out_ptr + gl.expand_dims(rows, 1) + gl.expand_dims(d, 0)
            gl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(r < rows_left, 1))
            ring += n_tiles
            done += 1


@gluon.jit
def _consume_lower(args):
    _consume(args, 0)


@gluon.jit
def _consume_upper(args):
    _consume(args, 1)


@gluon.jit
def _load(args, q_desc, k_desc, v_desc, block_tables, stride_bt, PAGE: gl.constexpr):
    """The loader (one thread issues): each tile's two Q halves, then its K and V tiles into the ring, as fast as
    the consumers free the buffers."""
    sched, total, q_smem, bufs, q_ready, q_empty, out_ptr, stride_ot, stride_oh, num_groups, scale_log2 = args
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = bufs
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_smem.shape[0]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    D: gl.constexpr = k_smem.shape[2]
    SUB: gl.constexpr = BLOCK_N if PAGE >= BLOCK_N else PAGE  # keys per bulk copy: a tile may span pages
    TILE_BYTES: gl.constexpr = BLOCK_N * D * k_smem.dtype.primitive_bitwidth // 8
    ring = 0
    done = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        valid, b, h, row0, pos0, rows_left, ctx, n_tiles = _work(t, sched, 2 * ROWS, BLOCK_N)
        if valid:
            for half in gl.static_range(2):  # a fresh mbarrier counts as having completed the phase before 0
                mbarrier.wait(q_empty.index(half), (done & 1) ^ 1)
                mbarrier.expect(q_ready.index(half), q_desc.block_type.nbytes)
                _tma_load(q_desc, [row0 + half * ROWS, h * D], q_ready.index(half), q_smem.index(half))
            table = block_tables + b * stride_bt
            kvh = h // num_groups
            for j in range(n_tiles):
                stage = (ring + j) % STAGES
                free = (((ring + j) // STAGES) & 1) ^ 1
                mbarrier.wait(k_empty.index(stage), free)
                mbarrier.expect(k_ready.index(stage), TILE_BYTES)
                for i in gl.static_range(BLOCK_N // SUB):
                    _tma_load(k_desc, [_slot(table, j * BLOCK_N + i * SUB, ctx, PAGE), kvh * D],
                              k_ready.index(stage), k_smem.index(stage).slice(i * SUB, SUB))
                mbarrier.wait(v_empty.index(stage), free)
                mbarrier.expect(v_ready.index(stage), TILE_BYTES)
                for i in gl.static_range(BLOCK_N // SUB):
                    _tma_load(v_desc, [_slot(table, j * BLOCK_N + i * SUB, ctx, PAGE), kvh * D],
                              v_ready.index(stage), v_smem.index(stage).slice(i * SUB, SUB))
            ring += n_tiles
            done += 1


@gluon.jit
def _slot(table, n, ctx, PAGE: gl.constexpr):
    """Pool row of context token n; tokens past the context read the last page (their scores are masked), so the
    block table is never read past its end."""
    n = gl.minimum(n, ctx - 1)
    return (gl.load(table + n // PAGE) * PAGE + n % PAGE).to(gl.int32)


@gluon.jit(do_not_specialize=["max_q_len", "stride_bt", "first_seq", "num_seqs", "num_slots", "num_q_rows",
                             "section"])  # they vary every step: no recompiles
def _prefill_sm90_kernel(
    q_ptr, k_cache, v_cache, block_tables, seq_lens, q_start, out_ptr, scale_log2,
    stride_qt, stride_kt, stride_bt, stride_ot, stride_oh, max_q_len, first_seq, num_seqs, num_slots, num_q_rows,
    section,
    NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE: gl.constexpr, ROWS: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr,
):
    SUB: gl.constexpr = BLOCK_N if PAGE >= BLOCK_N else PAGE
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_desc = tma.make_tensor_descriptor(q_ptr, [num_q_rows, stride_qt], [stride_qt, 1], [ROWS, HEAD_DIM], Q_LAYOUT)
    k_desc = tma.make_tensor_descriptor(k_cache, [num_slots, stride_kt], [stride_kt, 1], [SUB, HEAD_DIM], KV_LAYOUT)
    v_desc = tma.make_tensor_descriptor(v_cache, [num_slots, stride_kt], [stride_kt, 1], [SUB, HEAD_DIM], KV_LAYOUT)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], Q_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both warpgroups release a buffer
        mbarrier.init(v_empty.index(i), count=2)
    m_tiles = gl.cdiv(max_q_len, 2 * ROWS)
    sched = (seq_lens, q_start, first_seq, num_seqs, section, m_tiles)
    bufs = (k_smem, v_smem, k_ready, k_empty, v_ready, v_empty)
    args = (sched, m_tiles * num_seqs * NUM_HEADS, q_smem, bufs, q_ready, q_empty, out_ptr, stride_ot, stride_oh,
            GROUP, scale_log2)
    # The loader runs in the kernel's own 4 warps, left with few registers; each consumer warpgroup gets 240. (The
    # loader is the default partition because only it can take constexpr arguments such as PAGE.)
    gl.warp_specialize([(_load, (args, q_desc, k_desc, v_desc, block_tables, stride_bt, PAGE)),
                        (_consume_lower, (args, )), (_consume_upper, (args, ))], [4, 4], [240, 240])


def supported(q: torch.Tensor, k_cache: torch.Tensor, max_query_len: int) -> bool:
    """Whether this kernel takes the call (on a Hopper GPU): 16-bit dtypes, pages of at least 16 tokens that split
    or hold whole key tiles, a dense pool, heads contiguous in q, and queries long enough to fill 128-row tiles."""
    page = k_cache.shape[1]
    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] in (64, 128) and k_cache.is_contiguous()
            and page >= 16 and (page % BLOCK_N == 0 or BLOCK_N % page == 0) and q.stride(2) == 1
            and q.stride(1) == q.shape[2] and max_query_len > HALF_M)


def paged_prefill_sm90(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale_log2: float,
                       out: torch.Tensor, first_seq: int, num_sms: int, l2_bytes: int) -> torch.Tensor:
    """`attention.paged_prefill` on the Hopper kernel (which `supported` accepts); scale_log2 = scale * log2(e)."""
    hq, hk, d = q.shape[1], k_cache.shape[2], q.shape[2]
    # Heads per section: the K/V heads whose longest possible context fits in half the L2 cache, a divisor of hk.
    longest = block_tables.shape[1] * k_cache.shape[1]  # a bound on every context of the batch
    kv_bytes = 2 * longest * d * k_cache.element_size()
    kv_heads = 1
    while hk % (2 * kv_heads) == 0 and 2 * kv_heads * kv_bytes <= l2_bytes // 2:
        kv_heads *= 2
    # K/V ring depth. Measured on an H100 (TFLOP/s as a share of cuDNN SDPA's, two runs each): at 8K, 3 buffers
    # 1.01-1.02x against 2 buffers 1.00x; at 32K, 2 buffers 1.02-1.04x against 3 buffers 1.00-1.02x.
    stages = 2 if longest >= 16384 else 3
    num_seqs = seq_lens.shape[0] - first_seq
    work = cdiv(max_query_len, 2 * HALF_M) * num_seqs * hq
    _prefill_sm90_kernel[(min(work, num_sms), )](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale_log2,
        q.stride(0), k_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), max_query_len, first_seq,
        num_seqs, k_cache.shape[0] * k_cache.shape[1], q.shape[0], kv_heads * (hq // hk),
        NUM_HEADS=hq, GROUP=hq // hk, HEAD_DIM=d, PAGE=k_cache.shape[1], ROWS=HALF_M, BLOCK_N=BLOCK_N, STAGES=stages,
        **_layouts(d, q.dtype), num_warps=4, maxnreg=168,
    )
    return out


@functools.cache
def _layouts(d: int, dtype: torch.dtype) -> dict:
    """Shared-memory layouts of the Q and K/V tiles (the swizzle TMA and wgmma agree on), once per shape: building
    them costs ~6 µs each, on every layer's launch."""
    elem = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return dict(Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([HALF_M, d], elem),
                KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], elem))
