"""Fused attention prologue: optional per-head RMSNorm of q and k (Qwen3), RoPE (over all or the first part of each
head's dims), and the K/V store into the
paged pool, in one kernel reading the packed QKV projection once (instead of a dozen elementwise kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._pdl import await_inputs, pdl
from slipstream.kernels.fp8 import FP8_MAX


@triton.jit
def _store_fp8(dst, scale_dst, x, d):
    """A key or value row (float32, dims `d`) as FP8 E4M3 with its own scale: amax / 448 (1 for a zero row)."""
    amax = tl.max(tl.abs(x), 0)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    tl.store(dst + d, tl.clamp(x / scale, -FP8_MAX, FP8_MAX).to(dst.dtype.element_ty))
    tl.store(scale_dst, scale)


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, slot_ptr, q_out, k_cache, v_cache, k_scales, v_scales, qw_ptr, kw_ptr, eps,
    stride_t, stride_qt, stride_qh, stride_cs, stride_kt, stride_kh,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
    QK_NORM: tl.constexpr, SCALED: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)  # 0..NUM_HEADS-1: a query head; then the key/value heads
    d = tl.arange(0, HEAD_DIM)
    # RoPE pairs dim i with i + R/2 among the first R = ROTARY_DIM dims (the rest pass: partial rotary, GLM-4.5);
    # each lane reads its partner's value too
    half: tl.constexpr = ROTARY_DIM // 2
    rotated = d < ROTARY_DIM
    first = d < half
    partner = tl.where(first, d + half, tl.where(rotated, d - half, d))
    is_q = h < NUM_HEADS
    row = qkv_ptr + t * stride_t + h * HEAD_DIM
    x = tl.load(row + d).to(tl.float32)
    xp = tl.load(row + partner).to(tl.float32)
    if QK_NORM:
        if is_q:
            w = tl.load(qw_ptr + d).to(tl.float32)
            wp = tl.load(qw_ptr + partner).to(tl.float32)
        else:
            w = tl.load(kw_ptr + d).to(tl.float32)
            wp = tl.load(kw_ptr + partner).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, 0) / HEAD_DIM + eps)
        x = x * inv * w
        xp = xp * inv * wp
    pos = tl.load(pos_ptr + t)
    freq = tl.where(first, d, d - half)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + freq, mask=rotated, other=1.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + freq, mask=rotated, other=0.0)
    y = x * cos + tl.where(first, -xp, xp) * sin
    # Each branch names its own destination: the compiler wants a name bound in both branches of a run-time `if`
    # to have one type, and an FP8 pool's pointers are not the query's (the interpreter does not check this).
    if is_q:
        qdst = q_out + t * stride_qt + h * stride_qh
        tl.store(qdst + d, y.to(q_out.dtype.element_ty))
    else:
        kvh = h - NUM_HEADS
        slot = tl.load(slot_ptr + t)
        kdst = k_cache + slot * stride_kt + kvh * stride_kh
        v_row = row + NUM_KV_HEADS * HEAD_DIM
        vdst = v_cache + slot * stride_kt + kvh * stride_kh
        if SCALED:
            _store_fp8(kdst, k_scales + slot * NUM_KV_HEADS + kvh, y, d)
            _store_fp8(vdst, v_scales + slot * NUM_KV_HEADS + kvh, tl.load(v_row + d).to(tl.float32), d)
        else:
            tl.store(kdst + d, y.to(k_cache.dtype.element_ty))
            tl.store(vdst + d, tl.load(v_row + d))


def qk_norm_rope_store(
    qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, slot_mapping: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hk) D] -> rotated q [T, Hq, D]; rotated k and v written to the pool at `slot_mapping`
    (a slot is page * page_size + offset; the pool is [pages, page_size, Hk, D]). `kv_scales`: the pool is FP8 and
    these [pages, page_size, Hk] float32 take each written row's scale. `cos_sin` [positions, R] (cosines, then
    sines, of R / 2 frequencies) rotates the first R dims of each head; R < D leaves the rest as they are."""
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
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=cos_sin.shape[1], QK_NORM=norm,
        SCALED=kv_scales is not None, num_warps=1, **pdl(qkv),
    )
    return q
