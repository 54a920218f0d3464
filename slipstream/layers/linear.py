"""Projections with the elementwise op that precedes them: RMSNorm before QKV and gate-up, SwiGLU before down.

For one row (batch-1 decode) on the GPU the pair runs as one GEMV kernel that streams the weight once; for more
rows, or off the GPU, it runs as written: the op, then the matmul (cuBLAS)."""
from __future__ import annotations

import torch
from torch import nn

from slipstream import kernels
from slipstream.layers.activation import silu_and_mul
from slipstream.layers.norm import RMSNorm


def _gemv(x: torch.Tensor) -> bool:
    return kernels.enabled(x) and x.shape[0] == 1


def linear(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    if _gemv(x):
        return kernels.gemv(x, proj.weight, proj.bias)[0]
    return proj(x)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual); with no residual, (proj(norm(x)), x)."""
    if _gemv(x):
        return kernels.gemv(x, proj.weight, proj.bias, prologue="rmsnorm", residual=residual, norm_weight=norm.weight,
                            eps=norm.eps)
    h, residual = norm(x, residual)
    return proj(h), residual


def silu_mul_linear(gate_up: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """proj(silu(gate) * up) for a fused [gate | up] input."""
    if _gemv(gate_up):
        return kernels.gemv(gate_up, proj.weight, proj.bias, prologue="silu_mul")[0]
    return proj(silu_and_mul(gate_up))
