"""4-bit weights (W4A16): 16-bit activations times weights of 4-bit integers with a scale and an offset per group.

One layout for every 4-bit integer format: `qweight` uint8 [N, K / 2] (column 2j in the low nibble of byte j, 2j + 1
in the high one), `scales` and `offsets` float16 [N, K / group], and w = q * scale + offset. GGUF Q4_1 (d, m) maps
onto it as is, Q4_0 as (d, -8 d); `quantization="int4"` on a 16-bit checkpoint rounds each group of 128 to the
nearest of 16 levels between its minimum and maximum (RTN with a minimum; groups of 64 or fewer where the input
width is not a multiple of 128). Both are exact in this form: q * d and
8 d are exact in float32, so the dequantized weights equal the format's own arithmetic.

On the GPU the Triton kernels read the packed weight: the W4A16 GEMM (kernels/int4.py), and for one row the fused
GEMV (kernels/matvec.py, with the norm or SwiGLU before the projection); elsewhere (CPU, the torch backend) the
weights are dequantized once after loading, to the same values, and run as 16-bit weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slipstream import kernels
from slipstream.layers.quantization.spec import QuantSpec

if TYPE_CHECKING:
    from slipstream.layers.linear import Linear


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] of values 0..15 -> uint8 [N, K / 2], column 2j low, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> uint8 [N, K] of values 0..15 (the inverse of `pack`)."""
    return torch.stack((packed & 15, packed >> 4), -1).view(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`: q * scale + offset in float32 per group, then rounded once."""
    q = unpack(qweight).float()
    n, k = q.shape
    g = q.view(n, scales.shape[1], -1)
    return (g * scales.float()[..., None] + offsets.float()[..., None]).view(n, k).to(dtype)


def quantize_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (qweight, scales, offsets): per group, 16 levels from its minimum to its maximum, each weight
    rounded to the nearest. The scale and offset are rounded to float16 first, and q chosen against those."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 quantization needs the input width {k} to be a multiple of the group {group}")
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).half()
    offsets = lo.half()
    q = ((g - offsets.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    return pack(q.view(n, k)), scales, offsets


class Int4:
    supports_gemv = True

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.group = spec.group

    def create_weights(self, layer: "Linear") -> None:
        n, k = layer.out_features, layer.in_features
        self.dtype = torch.get_default_dtype()  # the model's: the dequantized weights' dtype off the GPU
        if not self.spec.serialized:  # 16-bit weights, quantized once loaded
            # groups of spec.group columns, or fewer where the input width is not a multiple (SmolLM2's 576: 64)
            self.group = next((g for g in (self.spec.group, 64, 32, 16) if g <= self.spec.group and k % g == 0), 0)
            if not self.group:
                raise ValueError(f"int4 quantization needs the input width {k} to be a multiple of 16")
            weight = nn.Parameter(torch.empty(n, k), requires_grad=False)
            layer.register_parameter("weight", weight)
            layer.set_loader(weight, stacked=True)
            return
        if k % self.group:
            raise ValueError(f"int4 weights need the input width {k} to be a multiple of the group {self.group}")
        for name, shape, dtype in (("qweight", (n, k // 2), torch.uint8), ("scales", (n, k // self.group), torch.float16),
                                   ("offsets", (n, k // self.group), torch.float16)):
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, p)
            layer.set_loader(p, stacked=True)

    def process_after_loading(self, layer: "Linear") -> None:
        """Packed on the GPU kernels' path (`qweight`, `scales`, `offsets`); elsewhere one dequantized `weight`."""
        if not self.spec.serialized:
            q, s, o = quantize_rtn(layer.weight.data, self.group)
            del layer.weight
        else:
            q, s, o = layer.qweight.data, layer.scales.data, layer.offsets.data
            del layer.qweight, layer.scales, layer.offsets
        if layer.fused:
            layer.qweight = nn.Parameter(q.contiguous(), requires_grad=False)
            layer.scales = nn.Parameter(s.contiguous(), requires_grad=False)
            layer.offsets = nn.Parameter(o.contiguous(), requires_grad=False)
        else:
            layer.weight = nn.Parameter(dequantize(q, s, o, self.dtype), requires_grad=False)

    def gemv(self, layer: "Linear", x: torch.Tensor, **prologue: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return kernels.gemv(x, layer.qweight, layer.bias, weight_scale=layer.scales, weight_offset=layer.offsets,
                            group=self.group, **prologue)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if layer.fused and x.is_cuda:
            if x.shape[0] == 1:
                return self.gemv(layer, x)[0]
            return kernels.w4a16_gemm(x, layer.qweight, layer.scales, layer.offsets, self.group, layer.bias)
        return F.linear(x, layer.weight, layer.bias)
