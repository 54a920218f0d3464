"""4-bit weights (W4A16): 16-bit activations times weights of 4-bit integers with a scale and an offset per group.

One layout for every 4-bit integer format: `qweight` uint8 [N, K / 2] (column 2j in the low nibble of byte j, 2j + 1
in the high one), `scales` float16 and `offsets` [N, K / group], and w = q * scale + offset:
  - GGUF Q4_1 (d, m) as is, Q4_0 as (d, -8 d), float16; Q4_K as (d sc, -dmin m) per sub-block of 32, float32;
  - AWQ (GEMM layout) and GPTQ, whose weights are (q - zero) * scale, as (scale, -zero * scale), float32 offsets;
  - compressed-tensors pack-quantized, (q - zero) * scale with signed q and zero stored as q + 8: as (scale,
    -(8 + zero) * scale), float32 scales and offsets;
  - NVFP4 and MXFP4 (compressed-tensors): FP4 E2M1 codes (not integers: 0, 0.5 .. 6, signed) with a float32 scale
    per group of 16 (FP8 scale / the projection's global scale) or 32 (2^(E8M0 - 127)) and no offsets: w = e2m1(q) *
    scale. The checkpoint's activation scales (NVFP4 W4A4) go unused: activations stay 16-bit;
    GPTQ's act-order columns are sorted into contiguous groups (`perm`: the input's columns are gathered to match);
  - `quantization="int4"` on a 16-bit checkpoint: each group of 128 (64 or fewer where the input width is not a
    multiple of 128) rounded to the nearest of 16 levels between its minimum and maximum (RTN with a minimum).
A GGUF file's 5-, 6- and 8-bit blocks stay 8-bit beside its 4-bit ones (`bits=8`), and so do 4-bit blocks fused
into one layer with those: `qweight` int8 [N, K], one integer a column, a scale per group and maybe an offset: w = q *
scale (+ offset), each kind's own arithmetic exactly (loader/gguf_loader.py wide_blocks); offsets that are all zero
(a layer of kinds without them, in a file that has some) are dropped once loaded.
Every form is exact: q * scale, zero * scale and Q4_K's products have at most 21 significant bits, so the
dequantized weights equal each format's own arithmetic in float32.

On the GPU the Triton kernels read the packed weight: for a few rows (up to kernels.LAYER_GEMV_ROWS) the fused GEMV
(kernels/matvec.py, with the norm or SwiGLU before the projection), then the W4A16 GEMM (kernels/int4.py), and past
kernels.W4A16_GEMM_ROWS rows (long prefills) the weight dequantized whole for that step and cuBLAS; elsewhere (CPU,
the torch backend) the weights are dequantized once after loading, to the same values, and run as 16-bit weights.
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


# FP4 E2M1 code -> value: sign bit 3, then exponent and mantissa (NVFP4 and MXFP4 store these nibbles)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype`: q * scale + offset in float32 per group, then rounded once; with no offsets the
    nibbles are FP4 E2M1 codes: e2m1(q) * scale; an int8 qweight holds the integers themselves: q * scale."""
    if qweight.dtype == torch.int8:
        q = qweight.float()
    else:
        u = unpack(qweight)
        q = E2M1.to(u.device)[u.long()] if offsets is None else u.float()
    n, k = q.shape
    g = q.view(n, scales.shape[1], -1) * scales.float()[..., None]
    return (g if offsets is None else g + offsets.float()[..., None]).view(n, k).to(dtype)


# AutoAWQ's GEMM layout packs 8 columns into an int32 in this order: column c sits in nibble AWQ_NIBBLE[c]
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_int32(packed: torch.Tensor, dim: int, nibble_of: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 words of 8 nibbles -> int values 0..15, the 8 values of a word becoming 8 consecutive entries along
    `dim` (0: rows, GPTQ's qweight [K / 8, N]; 1: columns, AWQ's qweight [K, N / 8] and both formats' qzeros);
    value j of a word is in nibble nibble_of[j]."""
    shifts = torch.tensor([4 * i for i in nibble_of], dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(-1) >> shifts) & 15  # [..., 8]
    if dim == 1:
        return vals.reshape(packed.shape[0], -1)
    return vals.permute(0, 2, 1).reshape(-1, packed.shape[1])


def pack_int32(vals: torch.Tensor, dim: int, nibble_of: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """The inverse of `unpack_int32`."""
    v = vals.to(torch.int32)
    v = v.reshape(v.shape[0], -1, 8) if dim == 1 else v.reshape(-1, 8, v.shape[1]).permute(0, 2, 1)
    out = torch.zeros(v.shape[:2], dtype=torch.int32, device=vals.device)
    for j, nib in enumerate(nibble_of):
        out |= v[..., j] << (4 * nib)
    return out


def from_zero_points(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """AWQ / GPTQ's w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n], g = k // group or group_of[k] (GPTQ's g_idx),
    -> (qweight, scales, offsets, perm) in our layout, transposed to [N, ...]: offsets = -zeros * scales in float32
    (exact: both have at most 15 significant bits), so the weights are the format's own, bit for bit. Where g_idx
    reorders the columns (act-order), perm sorts them into contiguous groups and x[:, perm] meets them."""
    perm = None
    if group_of is not None and bool((group_of[1:] < group_of[:-1]).any()):
        perm = torch.argsort(group_of, stable=True)
        q = q[perm]
    offsets = -(zeros.float() * scales.float())
    return pack(q.t().contiguous()), scales.t().contiguous(), offsets.t().contiguous(), perm


def online_group(k: int, group: int) -> int:
    """Columns per group when `quantization="int4"` rounds a 16-bit weight of input width k: `group`, or fewer where
    k is not a multiple (SmolLM2's 576: 64)."""
    g = next((g for g in (group, 64, 32, 16) if g <= group and k % g == 0), 0)
    if not g:
        raise ValueError(f"int4 quantization needs the input width {k} to be a multiple of 16")
    return g


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


def zero_point_grid(g: torch.Tensor, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of weights [R, G] -> (zero points int32 in min_zero..15, scales float16) of the 16-level grid spanning each
    row's range (stretched to hold 0, so a zero point exists)."""
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-5).half()
    zeros = (-lo / scales.float()).round().clamp(min_zero, 15)
    return zeros.to(torch.int32), scales


def quantize_zero_point(w: torch.Tensor, group: int, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q [N, K], zeros [N, K / group] integers in min_zero..15, scales float16 [N, K / group]) with
    W ≈ (q - zero) * scale: AWQ's and GPTQ's round-to-nearest. (AutoGPTQ stores zero - 1: min_zero=1 keeps it
    a nibble.)"""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    zeros, scales = zero_point_grid(g.reshape(-1, group), min_zero)
    zeros, scales = zeros.view(n, -1), scales.view(n, -1)
    q = (g / scales.float()[..., None] + zeros[..., None]).round().clamp(0, 15)
    return q.view(n, k).to(torch.int32), zeros, scales


class Int4:
    supports_gemv = True

    def __init__(self, spec: QuantSpec, bits: int = 4) -> None:
        """`bits=8`: the layer's GGUF blocks are kept 8-bit (kinds of 5 to 8 bits, or 4-bit ones fused with those)."""
        self.spec, self.bits = spec, bits
        self.group = spec.wide_group if bits == 8 else spec.group

    def create_weights(self, layer: "Linear") -> None:
        n, k = layer.out_features, layer.in_features
        self.dtype = torch.get_default_dtype()  # the model's: the dequantized weights' dtype off the GPU
        fmt = self.spec.format
        if not self.spec.serialized:  # 16-bit weights, quantized once loaded
            self.group = online_group(k, self.spec.group)
            weight = nn.Parameter(torch.empty(n, k), requires_grad=False)
            layer.register_parameter("weight", weight)
            layer.set_loader(weight, stacked=True)
            return
        if self.group == -1:  # one group per row
            self.group = k
        gguf = fmt.startswith("gguf")
        if k % self.group or (not gguf and (k % 8 or any(size % 8 for size in layer.output_sizes))):
            raise ValueError(f"int4 weights need the input width {k} to be a multiple of the group {self.group}"
                             + ("" if gguf else " and 8, and each fused projection's rows a multiple of 8"))
        g = k // self.group
        # How each tensor is cut for a tensor-parallel rank: `cols_per` input columns per entry of its input axis
        # (a row-parallel rank starts on a group's edge), `rows_per` output rows per entry of its output axis `dim`.
        per_group = self.group if self.spec.group != -1 else 0  # one group a row: every rank keeps it whole
        grouped = dict(cols_per=per_group)
        if gguf and self.bits == 8:  # one byte a weight, a scale (and an offset) per group
            dtype = torch.float32 if self.spec.wide_fp32 else torch.float16
            params = [("qweight", (n, k), torch.int8, dict(cols_per=1)), ("scales", (n, g), dtype, grouped)]
            if self.spec.wide_offsets:
                params.append(("offsets", (n, g), dtype, grouped))
        elif gguf:  # the loader repacked it: our layout, rows stacked
            dtype = torch.float32 if fmt == "gguf_k" else torch.float16
            params = [("qweight", (n, k // 2), torch.uint8, dict(cols_per=2)), ("scales", (n, g), dtype, grouped),
                      ("offsets", (n, g), dtype, grouped)]
        elif fmt in ("nvfp4", "mxfp4"):  # E2M1 codes two to a byte as ours; FP8 (NVFP4) or E8M0 (MXFP4) group scales
            params = [("weight_packed", (n, k // 2), torch.uint8, dict(cols_per=2)),
                      ("weight_scale", (n, g), torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8, grouped)]
            if fmt == "nvfp4":  # a global scale per projection for the weights, and one for W4A4's activations (unused)
                names = ("weight_global_scale", "input_global_scale") if self.spec.activations == "static" else ("weight_global_scale",)
                params += [(name, (len(layer.output_sizes),), torch.float32, dict(per_shard=True)) for name in names]
        elif fmt.startswith("ct"):  # compressed-tensors: [N, ...] tensors, 8 columns to an int32 (zero points: 8 rows)
            params = [("weight_packed", (n, k // 8), torch.int32, dict(cols_per=8)),
                      ("weight_scale", (n, g), torch.float32, grouped)]
            if fmt == "ct_asym":
                params.append(("weight_zero_point", (n // 8, g), torch.int32, dict(rows_per=8, cols_per=per_group)))
            # each fused projection's (rows, columns), checked once loaded
            shapes = nn.Parameter(torch.zeros(len(layer.output_sizes), 2, dtype=torch.int64), requires_grad=False)
            layer.register_parameter("weight_shape", shapes)
            # (read whole where it came lazily, as linear.materialize does: that module imports this one's package)
            shapes.weight_loader = lambda p, t, shard: p.data[shard or 0].copy_(
                (t if isinstance(t, torch.Tensor) else t.materialize()).reshape(2))
            shapes.shards = tuple(range(len(layer.output_sizes))) if len(layer.output_sizes) > 1 else (None,)
        else:  # AWQ / GPTQ: [K..., N] tensors, the outputs along columns (8 to an int32 where packed there)
            params = [("qweight", (k, n // 8) if fmt == "awq" else (k // 8, n), torch.int32,
                       dict(dim=1, rows_per=8, cols_per=1) if fmt == "awq" else dict(dim=1, cols_per=8)),
                      ("qzeros", (g, n // 8), torch.int32, dict(dim=1, rows_per=8, cols_per=per_group)),
                      ("scales", (g, n), torch.float16, dict(dim=1, cols_per=per_group))]
            if fmt != "awq":
                params.append(("g_idx", (k,), torch.int32, dict(same=True)))
        for name, shape, dtype, how in params:
            p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, p)
            layer.set_loader(p, stacked=True, **how)

    def _from_checkpoint(self, layer: "Linear") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        fmt = self.spec.format
        if fmt.startswith("gguf"):
            offsets = layer.offsets.data if hasattr(layer, "offsets") else None
            if self.bits == 8 and offsets is not None and not bool(offsets.any()):
                offsets = None  # (8-bit kinds without offsets, in a file with some)
            out = layer.qweight.data, layer.scales.data, offsets, None
            del layer.qweight, layer.scales
            if hasattr(layer, "offsets"):
                del layer.offsets
            return out
        if fmt in ("nvfp4", "mxfp4"):
            return self._from_fp4(layer)
        if fmt.startswith("ct"):
            return self._from_compressed_tensors(layer)
        scales = layer.scales.data
        if fmt == "awq":
            q = unpack_int32(layer.qweight.data, 1, AWQ_NIBBLE)
            zeros = unpack_int32(layer.qzeros.data, 1, AWQ_NIBBLE)
            group_of = None
        else:
            q = unpack_int32(layer.qweight.data, 0)
            zeros = unpack_int32(layer.qzeros.data, 1) + (1 if fmt == "gptq" else 0)
            group_of = layer.g_idx.data.long()
            del layer.g_idx
            if layer.take is not None and layer.take[0] == 1 and self.spec.group != -1:  # a row-parallel rank's groups
                group_of = group_of - layer.take[1][0] // self.group
                if bool((group_of < 0).any() or (group_of >= scales.shape[0]).any()):
                    raise ValueError("a GPTQ act-order checkpoint (g_idx out of column order) cannot be split by "
                                     "input columns: its groups span the ranks")
        del layer.qweight, layer.qzeros, layer.scales
        return from_zero_points(q, zeros, scales, group_of)

    def _from_compressed_tensors(self, layer: "Linear") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """compressed-tensors' w = (q - zero) * scale with q and zero signed 4-bit numbers stored as q + 8 (nibble j of
        an int32 is column 8i + j; of a zero point word, row 8i + j) -> ours: u = q + 8 as it is, the scale, and
        offset = -(8 + zero) * scale in float32 (exact)."""
        want = [[size, layer.in_features] for size in layer.output_sizes]
        got = layer.weight_shape.data.tolist()
        if layer.take is not None:  # a rank's share: the checkpoint names the whole projection; check the axis kept
            kept = 1 - layer.take[0]
            got, want = [[g[kept]] for g in got], [[w[kept]] for w in want]
        if got != want:
            raise ValueError(f"weight_shape {layer.weight_shape.data.tolist()} does not match the layer's {want}")
        u = unpack_int32(layer.weight_packed.data, 1)
        scales = layer.weight_scale.data  # float32: the checkpoint's 16-bit scales, exactly
        zeros = torch.zeros_like(scales, dtype=torch.float32)
        if hasattr(layer, "weight_zero_point"):
            zeros = unpack_int32(layer.weight_zero_point.data, 0).float() - 8
            del layer.weight_zero_point
        offsets = -(8 + zeros) * scales
        del layer.weight_packed, layer.weight_scale, layer.weight_shape
        return pack(u), scales, offsets, None

    def _from_fp4(self, layer: "Linear") -> tuple[torch.Tensor, torch.Tensor, None, None]:
        """NVFP4: w = e2m1(q) * fp8_scale / global_scale (one global scale per fused projection); MXFP4: w = e2m1(q) *
        2^(e - 127) -> the codes as they are, float32 scales, no offsets."""
        s = layer.weight_scale.data
        scales = s.float() if self.spec.format == "nvfp4" else torch.exp2(s.float() - 127)
        if hasattr(layer, "weight_global_scale"):
            rows = torch.repeat_interleave(layer.weight_global_scale.data,
                                           torch.tensor(layer.output_sizes, device=s.device))
            scales = scales / rows[:, None]
            del layer.weight_global_scale
        if hasattr(layer, "input_global_scale"):
            del layer.input_global_scale
        q = layer.weight_packed.data
        del layer.weight_packed, layer.weight_scale
        return q, scales, None, None

    def process_after_loading(self, layer: "Linear") -> None:
        """Packed on the GPU kernels' path (`qweight`, `scales`, `offsets`, and `perm` where GPTQ's act-order
        reorders the columns); elsewhere one dequantized `weight`, columns in the checkpoint's order."""
        perm = None
        if not self.spec.serialized:
            q, s, o = quantize_rtn(layer.weight.data, self.group)
            del layer.weight
        else:
            q, s, o, perm = self._from_checkpoint(layer)
        self.fp4 = o is None and self.bits == 4
        if layer.fused:
            layer.qweight = nn.Parameter(q.contiguous(), requires_grad=False)
            layer.scales = nn.Parameter(s.contiguous(), requires_grad=False)
            layer.offsets = None if o is None else nn.Parameter(o.contiguous(), requires_grad=False)
            if perm is not None:
                layer.register_buffer("perm", perm)
                self.supports_gemv = False  # the norm before the projection would meet the columns out of order
        else:
            w = dequantize(q, s, o, self.dtype)
            if perm is not None:
                w = torch.empty_like(w).index_copy_(1, perm, w)
            layer.weight = nn.Parameter(w, requires_grad=False)

    def gemv(self, layer: "Linear", x: torch.Tensor, **prologue: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return kernels.gemv(x, layer.qweight, layer.bias, weight_scale=layer.scales, weight_offset=layer.offsets,
                            group=self.group, fp4=self.fp4, **prologue)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if layer.fused and x.is_cuda:
            if hasattr(layer, "perm"):
                x = x.index_select(1, layer.perm)
            elif layer.runs_gemv(x):
                return self.gemv(layer, x)[0]
            if x.shape[0] > kernels.W4A16_GEMM_ROWS:
                w = kernels.dequantize_4bit(layer.qweight, layer.scales, layer.offsets, self.group, x.dtype, fp4=self.fp4)
                return F.linear(x, w, layer.bias)
            return kernels.w4a16_gemm(x, layer.qweight, layer.scales, layer.offsets, self.group, layer.bias, fp4=self.fp4)
        return F.linear(x, layer.weight, layer.bias)
