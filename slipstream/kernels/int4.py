"""W4A16: a 16-bit activation times a 4-bit weight, dequantized in registers as the tiles stream in (and W8A16 for
GGUF's 8-bit blocks, the same way).

The weight is stored as layers/quantization/int4.py lays it out: `qweight` uint8 [N, K / 2] (column 2j in the low
nibble of byte j, column 2j + 1 in the high one), and per group of `group` columns of a row a float16 `scale` and
an `offset` (float16 or float32): w = q * scale + offset (GGUF, AWQ, GPTQ and round-to-nearest: one layout); or FP4
E2M1 codes with a float32 scale per group and no offset (NVFP4, MXFP4): w = e2m1(q) * scale; or `qweight` int8
[N, K], one signed integer a column, with a scale (and maybe an offset) per group (GGUF's 5-, 6- and 8-bit blocks):
w = q * scale (+ offset). Each program
computes a BLOCK_M x BLOCK_N tile of the output; a K step of BLOCK_K (one group, or a part of one) loads BLOCK_N x
BLOCK_K / 2 bytes, splits the nibbles and feeds the tensor cores in the activation's dtype: unsigned nibbles in whole
groups as exact 16-bit values BIAS + q, the group's scale and offset applied to the dot's sums; otherwise each weight
dequantized in float32 first. A quarter of the bytes of a 16-bit weight cross memory: decode, bound by them, gains
up to 4x less the scales; at a few rows the K steps are cut into slices so that every SM streams weight bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET, cdiv, dot_precision
from slipstream.kernels._pdl import await_inputs, pdl
from slipstream.kernels._slices import COUNTS, arrive, leave, slice_sum, tile_counts


@triton.jit
def e2m1(q):
    """4-bit codes (sign, 2 exponent bits, 1 mantissa bit: FP4 E2M1) -> float32: 0, 0.5, 1, 1.5, 2, 3, 4, 6 signed."""
    q = q.to(tl.int32)
    e = (q >> 1) & 3
    m = (q & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((q & 8) != 0, -mag, mag)


@triton.jit
def one_plus_sixteenth(w, j: tl.constexpr):
    """1 + q / 16 as float32 for q the j-th nibble (bits 4j .. 4j + 3) of the int32 words w, exactly: q moved to the
    top of the mantissa of 1.0. A shift and one three-input logic op a weight, where an integer-to-float conversion
    runs at a quarter of the ALU rate (too slow to dequantize 4-bit weights at the rate memory brings them to a one-row
    GEMV)."""
    if j <= 4:
        b = w << (19 - 4 * j)
    else:
        b = w >> (4 * j - 19)
    return ((b & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


# The 8 columns of a word in half-precision pairs as the magic-number unpacking yields them: (0, 4), (1, 5), (2, 6),
# (3, 7), the first of each pair in the low 16 bits (column j at bits 4j; columns 2, 3, 6, 7 after a shift by 8).
# 1024 + q (columns 0, 2, 4, 6) and 64 + q (columns 1, 3, 5, 7, whose nibbles sit 4 bits higher: 64's half-precision
# step is 1/16) are exact, and so is subtracting the magic.
_WORD_DOT_F16 = tl.constexpr("""{
.reg .b32 t, m1024, m64, p0, p1, p2, p3, h;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m1024, 0x64006400;
mov.b32 m64, 0x54005400;
shr.u32 t, $1, 8;
lop3.b32 p0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 p1, $1, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 p2, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 p3, t, 0x00F000F0, 0x54005400, 0xEA;
sub.f16x2 p0, p0, m1024;
sub.f16x2 p1, p1, m64;
sub.f16x2 p2, p2, m1024;
sub.f16x2 p3, p3, m64;
mul.rn.f16x2 h, p0, $2;
fma.rn.f16x2 h, p1, $3, h;
fma.rn.f16x2 h, p2, $4, h;
fma.rn.f16x2 h, p3, $5, h;
mov.b32 {lo, hi}, h;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")


_EMULATE = tl.constexpr(INTERPRET)  # the CPU interpreter runs no inline assembly: word_dot_f16 in Triton's own ops


@triton.jit
def _half(bits):
    """The low 16 bits of int32 `bits` as a half-precision value."""
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _half_sum(w, x04, x15, x26, x37, SHIFT: tl.constexpr):
    """The interpreter's word_dot_f16 half: nibbles SHIFT / 4 .. SHIFT / 4 + 3 of w times x's halves at SHIFT, summed
    in half precision as the assembly sums them (each multiply-add rounded twice here, once there)."""
    h = ((w >> SHIFT) & 15).to(tl.float16) * _half(x04 >> SHIFT)
    h = (((w >> (SHIFT + 4)) & 15).to(tl.float16) * _half(x15 >> SHIFT) + h).to(tl.float16)
    h = (((w >> (SHIFT + 8)) & 15).to(tl.float16) * _half(x26 >> SHIFT) + h).to(tl.float16)
    return (((w >> (SHIFT + 12)) & 15).to(tl.float16) * _half(x37 >> SHIFT) + h).to(tl.float16)


@triton.jit
def word_dot_f16(w, x04, x15, x26, x37):
    """sum over j of q_j * x_j for the 8 nibbles q_j of each int32 word w and half-precision x (pairs packed in int32:
    x04 holds x_0 low and x_4 high, and so on), as float32. On the GPU inline PTX: the nibbles become
    half-precision pairs by one three-input logic op per two (the magic number OR-ed in) and meet x in paired
    multiply-adds, about two instructions a weight where unpacking to float32 one nibble at a time takes three or
    more, and at batch 1 the 4-bit GEMV is bound by those instructions, not by memory. Each of a word's two sums of
    four products (columns 0-3 and 4-7) is kept in half precision, every product and sum rounded, then they add in
    float32. Under the CPU interpreter the same sums in Triton's half-precision ops (tests only)."""
    if _EMULATE:
        return _half_sum(w, x04, x15, x26, x37, 0).to(tl.float32) + _half_sum(w, x04, x15, x26, x37, 16).to(tl.float32)
    return tl.inline_asm_elementwise(_WORD_DOT_F16, "=r,r,r,r,r,r", [w, x04, x15, x26, x37], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def half_pairs(a, SPANS: tl.constexpr, WORDS: tl.constexpr):
    """[SPANS, WORDS, 8] float32, the 8 columns of each word -> the four int32 tensors [SPANS, WORDS] of
    half-precision pairs word_dot_f16 takes."""
    bits = a.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.permute(tl.reshape(bits, [SPANS, WORDS, 2, 4]), (0, 1, 3, 2)))  # columns 0-3, 4-7
    pairs = lo | (hi << 16)
    even, odd = tl.split(tl.reshape(pairs, [SPANS, WORDS, 2, 2]))
    x04, x26 = tl.split(even)
    x15, x37 = tl.split(odd)
    return x04, x15, x26, x37


# How a weight's integers are stored (dequant_tile's CODE): unsigned nibbles, FP4 E2M1 nibbles, or signed bytes
# (GGUF's 5-, 6- and 8-bit blocks, kept 8-bit); each with a scale per group, and (OFFSET) an offset
CODE_U4, CODE_FP4, CODE_S8 = 0, 1, 2


@triton.jit
def dequant_tile(q_ptr, s_ptr, o_ptr, rows, ok, k0, group, stride_q, stride_s, dtype: tl.constexpr,
                 CODE: tl.constexpr, OFFSET: tl.constexpr, FINE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Rows `rows` (`ok`: in range) of a 4-bit (or `CODE_S8`: 8-bit) weight, columns k0 .. k0 + BLOCK_K ->
    [BLOCK_N, BLOCK_K] in `dtype`: BLOCK_N x BLOCK_K / 2 bytes (BLOCK_K for bytes), nibbles split, scaled (and
    offset) in float32. The tile lies within one group, or (`FINE`: groups narrower than the tile) each column takes
    its own group's scale."""
    r = rows.to(tl.int64)
    if CODE == 2:
        v = tl.load(q_ptr + r[:, None] * stride_q + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=ok[:, None],
                    other=0).to(tl.float32)
    else:
        rb = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(q_ptr + r[:, None] * stride_q + (k0 // 2 + rb)[None, :], mask=ok[:, None], other=0)
        q = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K])  # (lo, hi) = (2j, 2j + 1)
        v = e2m1(q) if CODE == 1 else q.to(tl.float32)
    if FINE:
        at = r[:, None] * stride_s + ((k0 + tl.arange(0, BLOCK_K)) // group)[None, :]
        w = v * tl.load(s_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        if OFFSET:
            w += tl.load(o_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        g = k0 // group
        w = v * tl.load(s_ptr + r * stride_s + g, mask=ok, other=0.0).to(tl.float32)[:, None]
        if OFFSET:
            w += tl.load(o_ptr + r * stride_s + g, mask=ok, other=0.0).to(tl.float32)[:, None]
    return w.to(dtype)


@triton.jit
def u4_biased(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """Bytes `packed` [BLOCK_N, BLOCK_K / 2] of unsigned nibbles -> [BLOCK_N, BLOCK_K] values BIAS + q in `dtype`, exact:
    for 16-bit dtypes the nibble is OR-ed into the mantissa of BIAS (1024 in float16, 128 in bfloat16, where the
    mantissa's last bit is worth 1), a logic op a weight where an integer-to-float conversion runs at a quarter of the
    ALU rate; the caller takes BIAS times the sum of x off the dot's sums. float32 converts (BIAS 0)."""
    q = tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K]).to(tl.int16)  # (lo, hi) = (2j, 2j + 1)
    if dtype == tl.float16:
        v = (q | 0x6400).to(tl.float16, bitcast=True)
    elif dtype == tl.bfloat16:
        v = (q | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        v = q.to(tl.float32)
    return v


@triton.jit
def u4_bias(dtype: tl.constexpr):
    """The BIAS of u4_biased's values in `dtype`."""
    bias: tl.constexpr = 1024.0 if dtype == tl.float16 else 128.0 if dtype == tl.bfloat16 else 0.0
    return bias


@triton.jit
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, group,
                  stride_xm, stride_qn, stride_sn, stride_ym,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, CODE: tl.constexpr, OFFSET: tl.constexpr,
                  FINE: tl.constexpr, SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of y = x @ W^T over the K steps of this program's slice (SPLIT_K slices of K).
    With SUMS (unsigned nibbles in whole groups: CODE 0, not FINE) the nibbles meet x as BIAS + q (u4_biased) and
    each group's scale and offset are applied to the dot's sums: y += scale * (x.(BIAS + q) - BIAS * sum(x)) +
    offset * sum(x), no per-weight multiply (decode tiles only: in 64 x 64 tiles the second accumulator took 184
    registers a thread where 108 did; sm_90, Triton 3.9, a static compile, unmeasured). SWAP computes the tile
    transposed (W's rows as the dot's M: at most 16 rows of x leave the tensor cores' M mostly idle otherwise). With
    SPLIT_K > 1 each slice's float32 sums go to `part_ptr`; the last slice of a tile to finish (an atomic count per
    tile, which it resets) adds them in slice order, so the result does not depend on which slice ends first. (It
    depends on the tile and the slices, which the autotuner times per process: two processes can differ in the last
    bits.)"""
    await_inputs(PDL)
    tl.static_assert(SWAP or not SUMS, "scales on the sums come with transposed (decode) tiles")
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m, ok_n = rm < M, rn < N
    rk = tl.arange(0, BLOCK_K)
    steps = K // BLOCK_K  # K is a multiple of BLOCK_K, which divides the group or is a multiple of it
    k_lo = pid_k * steps // SPLIT_K * BLOCK_K
    k_hi = (pid_k + 1) * steps // SPLIT_K * BLOCK_K
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k0 + rk)[None, :], mask=ok_m[:, None], other=0.0)
        if SUMS:
            packed = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_qn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :],
                             mask=ok_n[:, None], other=0)
            w = u4_biased(packed, BLOCK_N, BLOCK_K, x.dtype)
            at = rn * stride_sn + k0 // group  # (int32: rows x groups a row stay far below 2^31)
            scale = tl.load(s_ptr + at, mask=ok_n, other=0.0).to(tl.float32)
            shift = -u4_bias(x.dtype) * scale
            if OFFSET:
                shift += tl.load(o_ptr + at, mask=ok_n, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), 1)
            acc += tl.dot(w, tl.trans(x), input_precision=PRECISION) * scale[:, None] + shift[:, None] * x_sum[None, :]
        else:
            w = dequant_tile(q_ptr, s_ptr, o_ptr, rn, ok_n, k0, group, stride_qn, stride_sn, x.dtype, CODE, OFFSET,
                             FINE, BLOCK_N, BLOCK_K)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if SWAP:
        acc = tl.trans(acc)
    mask = ok_m[:, None] & ok_n[None, :]
    tile = rm.to(tl.int64)[:, None] * N + rn[None, :]
    last = True
    if SPLIT_K > 1:
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask=mask)
        count = count_ptr + pid_m * tl.num_programs(1) + pid_n
        last = arrive(count, SPLIT_K)
        if last:
            acc = slice_sum(part_ptr, tile, mask, M * N, acc, SPLIT_K)
            leave(count)
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=ok_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, o_ptr, w_ptr, N, K, group, stride_qn, stride_sn,
                       CODE: tl.constexpr, OFFSET: tl.constexpr, FINE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ok = rn < N
    w = dequant_tile(q_ptr, s_ptr, o_ptr, rn, ok, k0, group, stride_qn, stride_sn, w_ptr.dtype.element_ty, CODE, OFFSET,
                     FINE, BLOCK_N, BLOCK_K)
    tl.store(w_ptr + rn.to(tl.int64)[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], w, mask=ok[:, None])


def block_k(k: int, group: int) -> int:
    """The K step: the group, or the largest power of two up to 128 that divides it (and K); at least 32 where K
    allows (a K step of 16 in a 16-bit dot computed wrong on an H200 under Triton 3.6), the tile then spanning groups
    (fine_groups)."""
    step = 128
    while step > 16 and (max(group, 32) % step or k % step):
        step //= 2
    if (group % step and step % group) or k % step:
        raise ValueError(f"4-bit weights need groups of a multiple of 16 columns and K a multiple of 16 (group {group}, K {k})")
    return step


def fine_groups(step: int, group: int) -> bool:
    """Whether a K step spans several groups (each column then reads its own group's scale)."""
    return step > group


def _code(qweight: torch.Tensor, fp4: bool) -> int:
    return CODE_S8 if qweight.dtype == torch.int8 else CODE_FP4 if fp4 else CODE_U4


# Decode (at most 16 rows of x): tuned per weight shape at the first call (the engine warms up before capturing
# graphs). With few rows a tile's weight bytes are the whole cost; the N / BLOCK_N x SPLIT_K programs must keep enough
# of them in flight on every SM (a 4,096-row projection in 32-row tiles was 128 programs, one an SM). Decode tiles are
# transposed (SWAP): on an H100 every projection of the Llama-3.1-8B shape, at 4 and at 16 rows, chose them among both
# forms (tiles of 64 rows; 4 or 8 slices, but one for gate_up: docs/benchmarks.md, "The decode GEMM in slices").
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "SPLIT_K": split}, num_warps=4, num_stages=4)
    for bn in (32, 64, 128) for split in (1, 2, 4, 8)
]
_w4a16_decode = (_w4a16_kernel if INTERPRET
                 else triton.autotune(DECODE_CONFIGS, key=["N", "K", "CODE", "OFFSET", "FINE"])(_w4a16_kernel))
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in DECODE_CONFIGS)
# Fixed decode tiles instead of the tuned ones: the CPU interpreter's (tests set others, on the GPU too)
DECODE_TILES: dict | None = dict(BLOCK_N=32, SPLIT_K=2, num_warps=4, num_stages=1) if INTERPRET else None


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int,
               bias: torch.Tensor | None = None, fp4: bool = False) -> torch.Tensor:
    """x [M, K] (16/32-bit) @ W^T with W [N, K] = unpack(qweight) * scales + offsets per group -> [M, N] in x's dtype.
    `fp4`: the nibbles are FP4 E2M1 codes (NVFP4, MXFP4) and W = e2m1(unpack(qweight)) * scales (no offsets). An int8
    qweight [N, K] holds one signed integer a weight: W = qweight * scales (+ offsets where given)."""
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bk = block_k(k, group)
    code = _code(qweight, fp4)
    args = (x, qweight, scales, offsets if offsets is not None else scales, bias if bias is not None else y, y)
    form = dict(HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), CODE=code, OFFSET=offsets is not None,
                FINE=fine_groups(bk, group), BLOCK_K=bk)
    strides = (x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0))
    if m <= 16 and cdiv(n, 32) < COUNTS:  # (also within the grid's 65,535 column tiles)
        kernel, tiles = (_w4a16_decode, {}) if DECODE_TILES is None else (_w4a16_kernel, DECODE_TILES)
        if tiles.get("SPLIT_K", 1) > MAX_SPLIT_K:
            raise ValueError(f"decode tiles of {tiles['SPLIT_K']} slices: at most {MAX_SPLIT_K}")
        parts = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)
        kernel[lambda meta: (1, cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *args, parts, tile_counts(x.device), m, n, k, group, *strides, SUMS=code == CODE_U4 and not form["FINE"],
            BLOCK_M=16, SWAP=True, **form, **tiles, **pdl(x))
        return y
    if INTERPRET:
        bm, bn, warps, stages = 16, 32, 4, 1
    elif m <= 128:
        bm, bn, warps, stages = 64, 64, 4, 4
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    _w4a16_kernel[(cdiv(m, bm), cdiv(n, bn), 1)](*args, y, y, m, n, k, group, *strides, SUMS=False, BLOCK_M=bm, BLOCK_N=bn,
                                                 SPLIT_K=1, SWAP=False, **form, num_warps=warps, num_stages=stages,
                                                 **pdl(x))
    return y


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int, dtype: torch.dtype,
               fp4: bool = False) -> torch.Tensor:
    """The whole weight W [N, K] in `dtype`, from the layout `w4a16_gemm` reads (the same arithmetic, tile by tile):
    for steps of many rows, where one dequantization and a 16-bit GEMM beat dequantizing every tile once per
    BLOCK_M rows of the activation."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (1 if qweight.dtype == torch.int8 else 2)
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    bk = block_k(k, group)
    bn = 32 if INTERPRET else 64
    _dequantize_kernel[(cdiv(n, bn), k // bk)](qweight, scales, offsets if offsets is not None else scales, w, n, k, group,
                                               qweight.stride(0), scales.stride(0), CODE=_code(qweight, fp4),
                                               OFFSET=offsets is not None, FINE=fine_groups(bk, group), BLOCK_N=bn,
                                               BLOCK_K=bk, num_warps=4, **pdl(w))
    return w
