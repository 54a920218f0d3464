"""FP8 (E4M3) GEMM for W8A8 linear layers, and the activation quantization in front of it.

`quantize_fp8` turns a 16-bit activation [M, K] into FP8 with float32 scales: one per row (dynamic per token),
one per row and `group` columns (to meet 128 x 128 block-scaled weights), or a given static scale.

`fp8_gemm` computes (A * sa) @ (B * sb)^T for FP8 A [M, K] and B [N, K] (the weight as stored: both operands
K-major, the layout Hopper's FP8 tensor-core instructions read) and writes 16-bit C:
  - per-row x per-channel scales (sa [M] or [1], sb [N]): the K loop accumulates raw products in float32 and the
    epilogue multiplies by sa[m] * sb[n] once;
  - block scales (sa [M, K / 128], sb [N / 128, K / 128]): BLOCK_K is the scale block's 128 columns, so each
    K step's partial product is scaled by its own sa[:, kb] * sb[n / 128, kb] before it is added.
Tiles are autotuned per power-of-two bucket of M (not per M: a serving engine sees every M), and the engine's
warm-up before graph capture visits each bucket the decode graphs use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET, cdiv, next_pow2
from slipstream.kernels._pdl import await_inputs, pdl

FP8_MAX = tl.constexpr(448.0)  # largest finite E4M3 value (a constexpr: kernels read it)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, STATIC: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * K
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0), 1e-12) / FP8_MAX
        tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        tl.store(q_row + ks, q.to(q_ptr.dtype.element_ty), mask=ks < K)


@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, GROUP: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    row, g = tl.program_id(0), tl.program_id(1)
    ks = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + ks).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row * (K // GROUP) + g, scale)
    tl.store(q_ptr + row.to(tl.int64) * K + ks, tl.clamp(x / scale, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty))


def quantize_fp8(x: torch.Tensor, group: int = 0, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M], [M, K / group], or `scale` itself)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    if scale is not None:
        _quant_rows_kernel[(m,)](x, q, q, scale, k, x.stride(0), STATIC=True, BLOCK=1024, **pdl(x))
        return q, scale
    if group:
        if k % group:
            raise ValueError(f"activation width {k} is not a multiple of the scale group {group}")
        s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
        _quant_groups_kernel[(m, k // group)](x, q, s, k, x.stride(0), GROUP=group, **pdl(x))
        return q, s
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    _quant_rows_kernel[(m,)](x, q, s, s, k, x.stride(0), STATIC=False, BLOCK=1024, **pdl(x))
    return q, s


def _configs(small: bool) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 4})]
    shapes = ([(16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 5), (64, 64, 4, 4), (64, 128, 4, 4)]
              if small else
              [(64, 128, 4, 4), (128, 128, 8, 4), (128, 128, 4, 4), (128, 64, 4, 4), (128, 256, 8, 3), (64, 256, 8, 4)])
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET,
                     stride_am, stride_bn, stride_cm, stride_sa, stride_sb,
                     BLOCKWISE: tl.constexpr, SA_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SCALE_BN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     PDL: tl.constexpr):
    await_inputs(PDL)
    # Grouped tile order: GROUP_M row tiles walk the N tiles together, so a B tile is reused from L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if BLOCKWISE:
            sa = tl.load(sa_ptr + rm * stride_sa + kb, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptr + (rn // SCALE_BN) * stride_sb + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not BLOCKWISE:
        sa = tl.load(sa_ptr) if SA_SCALAR else tl.load(sa_ptr + rm, mask=m_ok, other=0.0)[:, None]
        acc = acc * sa * tl.load(sb_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_KEY = ["M_BUCKET", "N", "K", "BLOCKWISE"]
_gemm_small = triton.autotune(_configs(True), key=_KEY)(_fp8_gemm_kernel) if not INTERPRET else _fp8_gemm_kernel
_gemm_large = triton.autotune(_configs(False), key=_KEY)(_fp8_gemm_kernel) if not INTERPRET else _fp8_gemm_kernel


def fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype, block: tuple[int, int] | None = None) -> torch.Tensor:
    """(a * sa) @ (b * sb)^T (+ bias) in out_dtype; a [M, K] and b [N, K] FP8. Scales: sa [M] or [1] with sb [N];
    or, with `block` = (bn, 128), sa [M, K / 128] and sb [N / bn, K / 128]."""
    m, k = a.shape
    n = b.shape[0]
    if block is not None and block[1] != 128:
        raise ValueError(f"block-scaled fp8 GEMM takes 128-column scale blocks, got {block}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    bucket = min(next_pow2(m), 4096)
    kernel = _gemm_small if bucket <= 64 else _gemm_large
    extra = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4) if INTERPRET else {}
    kernel[lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)](
        a, b, c, sa, sb, bias if bias is not None else c, m, n, k, bucket,
        a.stride(0), b.stride(0), c.stride(0), sa.stride(0) if sa.dim() == 2 else 0, sb.stride(0) if sb.dim() == 2 else 0,
        BLOCKWISE=block is not None, SA_SCALAR=sa.numel() == 1, HAS_BIAS=bias is not None,
        SCALE_BN=block[0] if block else 1, **extra, **pdl(a),
    )
    return c
