"""SwiGLU activation on a fused [gate | up] projection: out = silu(gate) * up, in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import cdiv
from slipstream.kernels._pdl import await_inputs, pdl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(x2.shape[0], cdiv(n, block))](x2, out, n, x2.stride(0), out.stride(0), BLOCK=block,
                                                         num_warps=4, **pdl(x2))
    return out.view(*shape[:-1], n)
