"""Fused attention prologue: optional per-head RMSNorm of q and k (Qwen3), RoPE, and the K/V store into the
paged pool, in one kernel reading the packed QKV projection once (instead of a dozen elementwise kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels.fp8 import FP8_MAX


@triton.jit
def _store_fp8(dst, scale_dst, x1, x2, HALF: tl.constexpr):
    """A key or value row (its two halves, float32) as FP8 E4M3 with its own scale: amax / 448 (1 for a zero row)."""
    amax = tl.maximum(tl.max(tl.abs(x1), 0), tl.max(tl.abs(x2), 0))
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    half = tl.arange(0, HALF)
    tl.store(dst + half, tl.clamp(x1 / scale, -FP8_MAX, FP8_MAX).to(dst.dtype.element_ty))
    tl.store(dst + HALF + half, tl.clamp(x2 / scale, -FP8_MAX, FP8_MAX).to(dst.dtype.element_ty))
    tl.store(scale_dst, scale)


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, slot_ptr, q_out, k_cache, v_cache, k_scales, v_scales, qw_ptr, kw_ptr, eps,
    stride_t, stride_qt, stride_qh, stride_cs, stride_kt, stride_kh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr,
    SCALED: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)  # 0..NUM_HEADS-1: a query head; then the key/value heads
    half = tl.arange(0, HEAD_DIM // 2)
    is_q = h < NUM_HEADS
    col = h * HEAD_DIM
    row = qkv_ptr + t * stride_t + col
    x1 = tl.load(row + half).to(tl.float32)
    x2 = tl.load(row + HEAD_DIM // 2 + half).to(tl.float32)
    if QK_NORM:
        if is_q:
            w1 = tl.load(qw_ptr + half).to(tl.float32)
            w2 = tl.load(qw_ptr + HEAD_DIM // 2 + half).to(tl.float32)
        else:
            w1 = tl.load(kw_ptr + half).to(tl.float32)
            w2 = tl.load(kw_ptr + HEAD_DIM // 2 + half).to(tl.float32)
        inv = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM + eps)
        x1 = x1 * inv * w1
        x2 = x2 * inv * w2
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + half)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HEAD_DIM // 2 + half)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    # Each branch names its own destination: the compiler wants a name bound in both branches of a run-time `if`
    # to have one type, and an FP8 pool's pointers are not the query's (the interpreter does not check this).
    if is_q:
        qdst = q_out + t * stride_qt + h * stride_qh
        tl.store(qdst + half, y1.to(q_out.dtype.element_ty))
        tl.store(qdst + HEAD_DIM // 2 + half, y2.to(q_out.dtype.element_ty))
    else:
        kvh = h - NUM_HEADS
        slot = tl.load(slot_ptr + t)
        kdst = k_cache + slot * stride_kt + kvh * stride_kh
        v_row = row + NUM_KV_HEADS * HEAD_DIM
        vdst = v_cache + slot * stride_kt + kvh * stride_kh
        if SCALED:
            _store_fp8(kdst, k_scales + slot * NUM_KV_HEADS + kvh, y1, y2, HEAD_DIM // 2)
            v1 = tl.load(v_row + half).to(tl.float32)
            v2 = tl.load(v_row + HEAD_DIM // 2 + half).to(tl.float32)
            _store_fp8(vdst, v_scales + slot * NUM_KV_HEADS + kvh, v1, v2, HEAD_DIM // 2)
        else:
            tl.store(kdst + half, y1.to(k_cache.dtype.element_ty))
            tl.store(kdst + HEAD_DIM // 2 + half, y2.to(k_cache.dtype.element_ty))
            tl.store(vdst + half, tl.load(v_row + half))
            tl.store(vdst + HEAD_DIM // 2 + half, tl.load(v_row + HEAD_DIM // 2 + half))


def qk_norm_rope_store(
    qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, slot_mapping: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hk) D] -> rotated q [T, Hq, D]; rotated k and v written to the pool at `slot_mapping`
    (a slot is page * page_size + offset; the pool is [pages, page_size, Hk, D]). `kv_scales`: the pool is FP8 and
    these [pages, page_size, Hk] float32 take each written row's scale."""
    t = qkv.shape[0]
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    norm = q_norm is not None
    ks, vs = kv_scales if kv_scales is not None else (flat_k, flat_v)
    if kv_scales is not None and not (ks.is_contiguous() and vs.is_contiguous()):
        raise ValueError("an FP8 pool's scales must be contiguous: they are written at slot * Hk + head")
    _qk_norm_rope_store_kernel[(t, num_heads + num_kv_heads)](
        qkv, positions, cos_sin, slot_mapping, q, flat_k, flat_v, ks, vs, q_norm if norm else qkv, k_norm if norm else qkv,
        eps, qkv.stride(0), q.stride(0), q.stride(1), cos_sin.stride(0), flat_k.stride(0), flat_k.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, QK_NORM=norm, SCALED=kv_scales is not None,
        num_warps=1,
    )
    return q
