from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream import kernels


def silu_and_mul(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection: silu(gate) * up (`fused`: the Triton kernel)."""
    if fused:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
