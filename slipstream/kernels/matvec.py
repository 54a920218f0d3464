"""GEMV y = f(x) @ W^T for one row x (batch-1 decode), with the elementwise op f before the projection fused in.

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
x is re-read by every program, but it is a few KB and stays in L2. What meets W is rounded to x's dtype, as the
unfused kernels round their outputs (for "rmsnorm" that is w_norm * (x + residual), before the 1/rms scale).
FP8 weights come with scales: one per output row (applied to the row's sum) or one per block of rows x columns
(applied to each weight as it is loaded; the scale tile is a few hundred bytes and stays in L1). 4-bit weights
(layers/quantization/int4.py: bytes of two columns, a scale and an offset per group of a row) are unpacked and
dequantized as they load, then rounded to x's dtype as the W4A16 GEMM rounds them; so are 8-bit integer weights (GGUF
5-, 6- and 8-bit blocks: a signed byte a column, a scale and maybe an offset per group).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET, cdiv
from slipstream.kernels.int4 import e2m1

_PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}

CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(2, 1024, 4, 4), (4, 512, 4, 4), (4, 1024, 8, 3), (8, 256, 4, 4), (8, 512, 4, 3),
                         (8, 512, 8, 4), (16, 256, 4, 4), (16, 256, 8, 3), (16, 512, 8, 2), (32, 128, 4, 4),
                         # FP8 weights: half the bytes per column, so wider K tiles keep as many loads in flight
                         (4, 2048, 8, 3), (8, 1024, 8, 3), (16, 1024, 8, 3), (32, 512, 8, 3)]
]


@triton.jit
def weight_tile(w_ptr, ws_ptr, wo_ptr, ns, n_ok, k0, K, stride_w, stride_ws, dtype: tl.constexpr,
                SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows `ns` (`n_ok`: in range), columns k0 .. k0 + BLOCK_K (those below K) of a weight as float32 [BLOCK_N, BLOCK_K], its block
    scales applied (SCALE 2), 4- and 8-bit weights dequantized and rounded to `dtype`; a scale per row (SCALE 1) is
    the caller's, applied to the row's sum. SCALE: 0 none, 1 one per output row, 2 one per SCALE_BN x SCALE_BK block,
    3 4-bit weights with a scale and an offset per SCALE_BK columns of a row, 4 FP4 E2M1 weights with a scale per
    SCALE_BK columns of a row, 5 8-bit integer weights with a scale per SCALE_BK columns of a row, 6 the same with an
    offset too."""
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


@triton.jit(do_not_specialize=["eps"])
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, b_ptr, y_ptr, res_out_ptr, N, K, eps, stride_w, stride_ws,
                 PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # SCALE: as weight_tile reads it
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    # Products accumulate elementwise and are reduced across K once at the end, not with shuffles every tile.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if PROLOGUE == 2:
            gate = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = gate * tl.sigmoid(gate) * up
        else:
            a = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_RES:
                a += tl.load(res_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                if pid == 0:
                    tl.store(res_out_ptr + ks, a.to(res_out_ptr.dtype.element_ty), mask=k_ok)
            if PROLOGUE == 1:
                sq += a * a
                a = a * tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = weight_tile(w_ptr, ws_ptr, wo_ptr, ns, n_ok, k0, K, stride_w, stride_ws, x_ptr.dtype.element_ty,
                        SCALE, SCALE_BN, SCALE_BK, BLOCK_N, BLOCK_K)
        acc += w * a.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if SCALE == 1:
        y *= tl.load(ws_ptr + ns, mask=n_ok, other=0.0)
    if PROLOGUE == 1:
        y = y * tl.math.rsqrt(tl.sum(sq, 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + ns, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# Tuned once per weight shape and prologue, at the first call (the engine warms up before capturing graphs).
_gemv = _gemv_kernel if INTERPRET else triton.autotune(CONFIGS, key=["N", "K", "PROLOGUE", "SCALE"])(_gemv_kernel)
FIXED = dict(BLOCK_N=8, BLOCK_K=64) if INTERPRET else {}  # small tiles make CPU tests cross tile borders


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 1e-6, weight_scale: torch.Tensor | None = None,
         scale_block: tuple[int, int] | None = None, weight_offset: torch.Tensor | None = None,
         group: int = 0, fp4: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """f(x) @ W.T (+ bias) for x of shape [1, K] ([1, 2K] for "silu_mul"); returns (y, new residual or None).

    W = weight, or for FP8 weights weight * weight_scale: per output row ([N]), or per `scale_block` block; for
    4-bit weights (uint8 [N, K / 2]) unpack(weight) * weight_scale + weight_offset per `group` columns, or with `fp4`
    e2m1(unpack(weight)) * weight_scale; for 8-bit ones (int8 [N, K]) weight * weight_scale (+ weight_offset) per
    `group` columns.
    "rmsnorm" needs norm_weight; it returns x + residual as the new residual, or x itself without a residual."""
    four_bit, eight_bit = weight.dtype == torch.uint8, weight.dtype == torch.int8
    n, k = weight.shape[0], weight.shape[1] * (2 if four_bit else 1)
    if x.shape != (1, 2 * k if prologue == "silu_mul" else k):
        raise ValueError(f"gemv takes one row matching weight {tuple(weight.shape)} and prologue {prologue!r}, got {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    res_out = None
    if prologue == "rmsnorm":
        res_out = x if residual is None else torch.empty_like(x)
    scale = ((4 if fp4 else 3) if four_bit else (5 if weight_offset is None else 6) if eight_bit
             else 0 if weight_scale is None else (1 if scale_block is None else 2))
    bn, bk = (1, group) if four_bit or eight_bit else scale_block or (1, 1)
    _gemv[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](
        x, residual.contiguous() if residual is not None else x, norm_weight if norm_weight is not None else weight,
        weight, weight_scale if weight_scale is not None else x, weight_offset if weight_offset is not None else x,
        bias if bias is not None else x, y,
        res_out if res_out is not None else y, n, k, eps, weight.stride(0),
        weight_scale.stride(0) if weight_scale is not None else 0,
        PROLOGUE=_PROLOGUES[prologue], HAS_RES=residual is not None and prologue == "rmsnorm", HAS_BIAS=bias is not None,
        SCALE=scale, SCALE_BN=bn, SCALE_BK=bk, **FIXED,
    )
    return y, res_out
