"""Fused residual add + RMSNorm: one read of x and the residual, one write of each result."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import next_pow2
from slipstream.kernels._pdl import await_inputs, pdl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * stride_o + cols, x.to(res_out_ptr.dtype.element_ty), mask=ok)
    inv = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); with no residual, (rms_norm(x) * weight, x)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = x2.shape[1]
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if residual is None:
        res_out, r2 = x, x2
    else:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(out)
    block = next_pow2(n)
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, res_out, n, eps, x2.stride(0), r2.stride(0), out.stride(0),
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)), **pdl(x2),
    )
    return out.view(shape), res_out.view(shape)
