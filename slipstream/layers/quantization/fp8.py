"""FP8 (E4M3) weights: W8A8 for steps of many rows, W8A16 GEMV for one row or a few.

A weight is stored as FP8 values q and float32 scales s with W = q * s, where s is one value per output channel
(per-tensor checkpoints are expanded to one per channel of each stacked shard) or one per block of 128 x 128
weights (DeepSeek-V3 / Qwen3-FP8). Activations of a many-row step are quantized too, with a scale per token
(per token and 128-column group for block weights) computed as the step runs, or one calibrated scale per layer
from the checkpoint; the GEMM then runs on FP8 tensor cores and applies both scales in its epilogue (per block,
inside the K loop). One row (batch-1 decode), or a few (up to kernels.LAYER_GEMV_ROWS: a verifying step, a small batch),
is bandwidth-bound: the GEMV streams the FP8 weight, scales it in registers and multiplies the 16-bit activation as it
is, so the norm or SwiGLU before it stays fused.

Off the GPU kernels (CPU, or the torch attention backend) the reference path computes the same arithmetic in
the model's dtype: dequantized weights times activations rounded through FP8 with the same scales.
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

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# Weight scales are amax times the float32 reciprocal of FP8_MAX: CUDA divides a tensor by a scalar that way, the CPU
# divides exactly, and the two disagreed in the last bit for half the rows of a checkpoint quantized on the CPU vs
# the same weights quantized at load on an H200.
_INV_MAX = 1.0 / FP8_MAX
DUMMY_SCALE = 0.05 / FP8_MAX  # random weights: FP8 values across the whole range, weights in ±0.05


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (q FP8 [N, K], s float32 [N]) with W ≈ q * s[:, None]."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], 4096):  # rows in chunks: no float32 copy of a whole large matrix
        chunk = w[r : r + 4096].float()
        s[r : r + 4096] = chunk.abs().amax(1).clamp(min=1e-12) * _INV_MAX
        q[r : r + 4096] = (chunk / s[r : r + 4096, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def quantize_weight_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q FP8 [N, K], s float32 [ceil(N / bn), ceil(K / bk)]): one scale per bn x bk block."""
    bn, bk = block
    n, k = w.shape
    padded = F.pad(w.float(), (0, -k % bk, 0, -n % bn))
    tiles = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    s = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) * _INV_MAX
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:n, :k].to(FP8)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    """q * s in `dtype`: s per channel [N], or per block [N / bn, K / bk] when `block` is given."""
    if block is None:
        return (q.float() * s[:, None]).to(dtype)
    bn, bk = block
    full = s.repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    return (q.float() * full).to(dtype)


def quantize_activation_ref(x: torch.Tensor, group: int = 0, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q FP8, scales float32): per row [M], per row and `group` columns [M, K / group], or the static
    `scale` ([1]). The reference of kernels.quantize_fp8."""
    xf = x.float()
    if scale is not None:
        s = scale.float().reshape(1)
        return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s
    if group:
        m, k = xf.shape
        g = xf.view(m, k // group, group)
        s = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
        return (g / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, k).to(FP8), s
    s = xf.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    if s.numel() == 1:
        return (q.float() * s).to(dtype)
    if group:
        return (q.float().view(q.shape[0], -1, group) * s[..., None]).view(q.shape).to(dtype)
    return (q.float() * s[:, None]).to(dtype)


class Fp8:
    supports_gemv = True

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.block = spec.block if spec.weight_scales == "block" else None
        # Activation scales per 128-column group go with block weights (one scale per K block of both operands).
        self.group = spec.block[1] if self.block else 0

    def create_weights(self, layer: "Linear") -> None:
        n, k, spec = layer.out_features, layer.in_features, self.spec
        if not spec.serialized:  # 16-bit weights, quantized once loaded
            weight = nn.Parameter(torch.empty(n, k), requires_grad=False)
            layer.register_parameter("weight", weight)
            layer.set_loader(weight, stacked=True)
            return
        weight = nn.Parameter(torch.empty(n, k, dtype=FP8), requires_grad=False)
        weight.dummy_scale = 1 / DUMMY_SCALE
        layer.register_parameter("weight", weight)
        layer.set_loader(weight, stacked=True)
        if spec.weight_scales == "tensor":
            scale = nn.Parameter(torch.empty(len(layer.output_sizes), dtype=torch.float32), requires_grad=False)
            layer.set_loader(scale, stacked=True, per_shard=True)
        elif spec.weight_scales == "channel":
            scale = nn.Parameter(torch.empty(n, 1, dtype=torch.float32), requires_grad=False)
            layer.set_loader(scale, stacked=True, cols_per=0)
        else:
            bn, bk = spec.block
            if k % bk or (len(layer.output_sizes) > 1 and any(size % bn for size in layer.output_sizes)):
                raise ValueError(f"block-scaled fp8 needs the input width {k} to be a multiple of {bk} and each fused "
                                 f"projection's rows {layer.output_sizes} a multiple of {bn}")
            scale = nn.Parameter(torch.empty(-(-n // bn), -(-k // bk), dtype=torch.float32), requires_grad=False)
            layer.set_loader(scale, stacked=True, rows_per=bn, cols_per=bk)
        scale.dummy_value = DUMMY_SCALE
        layer.register_parameter(spec.scale_name, scale)
        if spec.activations == "static":
            input_scale = nn.Parameter(torch.empty(len(layer.output_sizes), dtype=torch.float32), requires_grad=False)
            input_scale.dummy_value = 1.0 / FP8_MAX
            layer.set_loader(input_scale, stacked=True, per_shard=True)
            layer.register_parameter("input_scale", input_scale)

    def process_after_loading(self, layer: "Linear") -> None:
        """Leave `weight` (FP8), `weight_scale` (per channel [N] or per block) and, static, `input_scale` ([1])."""
        spec = self.spec
        if not spec.serialized:
            q, s = quantize_weight_per_channel(layer.weight.data)
        else:
            q, s = layer.weight.data, getattr(layer, spec.scale_name).data.float()
            delattr(layer, spec.scale_name)
            if spec.weight_scales == "tensor":  # one scale per stacked shard -> one per output channel
                s = s.repeat_interleave(torch.tensor(layer.output_sizes, device=s.device))
            elif spec.weight_scales == "channel":
                s = s.reshape(-1)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(s.contiguous(), requires_grad=False)
        if spec.activations == "static":  # the shards share one input: one scale, the largest calibrated
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1), requires_grad=False)

    def gemv(self, layer: "Linear", x: torch.Tensor, **prologue: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return kernels.gemv(x, layer.weight, layer.bias, weight_scale=layer.weight_scale, scale_block=self.block, **prologue)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        static = layer.input_scale if self.spec.activations == "static" else None
        if layer.fused and x.is_cuda:
            if layer.runs_gemv(x):
                return self.gemv(layer, x)[0]
            xq, xs = kernels.quantize_fp8(x, self.group, static)
            return kernels.fp8_gemm(xq, xs, layer.weight, layer.weight_scale, layer.bias, x.dtype, self.block)
        xq, xs = quantize_activation_ref(x, self.group, static)
        w = dequantize(layer.weight, layer.weight_scale, self.block, x.dtype)
        return F.linear(dequantize_activation(xq, xs, self.group, x.dtype), w, layer.bias)
