"""4-bit weights (W4A16): the packed layout; GGUF Q4_0 / Q4_1 / Q4_K blocks decoded by hand and against the gguf
package; AWQ and GPTQ checkpoints packed by an independent writer; round-to-nearest and GPTQ quantization and the
checkpoints `slipstream quantize` writes; the Triton GEMM and GEMV against their torch references (interpreter,
fp16/fp32); the embedded Q4_1 model and mixed GGUFs kept 4-bit (and 8-bit: Q8_0, Q6_K) giving the weights and
greedy tokens of the dequantize-at-load path."""
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from conftest import gemv_prologue_ref
from slipstream import LLM, SamplingParams
from slipstream.kernels._slices import tile_counts
from slipstream.layers.quantization import QuantSpec, resolve_quantization
from slipstream.layers.quantization.int4 import dequantize, pack, quantize_rtn, unpack
from slipstream.loader.gguf_loader import q4_blocks

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def test_pack_is_adjacent_pairs_low_first():
    q = torch.tensor([[1, 2, 3, 15], [0, 9, 14, 7]], dtype=torch.uint8)
    packed = pack(q)
    assert packed.tolist() == [[1 | 2 << 4, 3 | 15 << 4], [0 | 9 << 4, 14 | 7 << 4]]
    assert torch.equal(unpack(packed), q)


def test_q4_blocks_by_hand():
    """One Q4_1 block and one Q4_0 block written byte by byte: d, (m), then byte j = weight j | weight j + 16 << 4."""
    lo, hi = np.arange(16, dtype=np.uint8), 15 - np.arange(16, dtype=np.uint8)
    qs = lo | (hi << 4)
    q4_1 = np.concatenate([np.array([0.5, -1.0], dtype=np.float16).view(np.uint8), qs])[None]
    q, d, m = q4_blocks(q4_1, "Q4_1", 1, 32)
    expected = np.concatenate([lo, hi]) * 0.5 - 1.0
    got = dequantize(pack(torch.from_numpy(q)), torch.from_numpy(d), torch.from_numpy(m), torch.float32)
    assert got[0].tolist() == expected.tolist()
    assert np.array_equal(gguf_dequantize(q4_1, GGMLQuantizationType.Q4_1)[0], expected)
    q4_0 = np.concatenate([np.array([0.25], dtype=np.float16).view(np.uint8), qs])[None]
    q, d, m = q4_blocks(q4_0, "Q4_0", 1, 32)
    got = dequantize(pack(torch.from_numpy(q)), torch.from_numpy(d), torch.from_numpy(m), torch.float32)
    assert got[0].tolist() == ((np.concatenate([lo, hi]).astype(np.float32) - 8) * 0.25).tolist()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks_equal_the_gguf_package(kind):
    """Random rows quantized by the gguf package: our repacked form dequantizes to its values, bit for bit."""
    w = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    blocks = gguf_quantize(w, GGMLQuantizationType[kind])
    q, d, m = q4_blocks(blocks, kind, 6, 256)
    got = dequantize(pack(torch.from_numpy(q)), torch.from_numpy(d), torch.from_numpy(m), torch.float32)
    assert torch.equal(got, torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType[kind])))


def test_rtn_error_is_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    qweight, scales, offsets = quantize_rtn(w, 128)
    err = (dequantize(qweight, scales, offsets, torch.float32) - w).abs().view(64, 2, 128)
    assert (err <= scales.float()[..., None] * 0.5 + 1e-3).all()
    assert unpack(qweight).max() == 15 and unpack(qweight).min() == 0


def test_resolve_quantization_for_4bit_checkpoints():
    gguf = QuantSpec("int4", serialized=True, group=32, format="gguf")
    assert resolve_quantization("int4", gguf) == gguf
    assert resolve_quantization("auto", gguf) == resolve_quantization("none", gguf) == QuantSpec()  # dequantized
    assert resolve_quantization("fp8", gguf).method == "fp8"  # from the dequantized weights
    online = resolve_quantization("int4", QuantSpec())
    assert online.method == "int4" and not online.serialized
    with pytest.raises(ValueError, match="holds fp8"):
        resolve_quantization("int4", QuantSpec("fp8", serialized=True))
    awq = QuantSpec("int4", serialized=True, format="awq")
    assert resolve_quantization("auto", awq) == awq  # AWQ / GPTQ run 4-bit as stored
    with pytest.raises(ValueError, match="holds int4"):
        resolve_quantization("none", awq)


def fp4_weights(n, k, group, g):
    """Random FP4 E2M1 codes and float32 group scales: (qweight, scales) with w = e2m1(q) * scale."""
    return pack(torch.randint(0, 16, (n, k), generator=g)), torch.rand(n, k // group, generator=g) * 0.01 + 0.001


def packed_weights(kind, n, k, group, g, spread=0.05):
    """(qweight, scales, offsets) of random weights: "int4" rounded to nearest, "fp4" E2M1 codes, "int8" signed bytes
    with float32 (group 16) or float16 scales, as GGUF's Q6_K and Q8_0 are kept."""
    if kind == "fp4":
        return *fp4_weights(n, k, group, g), None
    if kind == "int8":
        scales = (torch.rand(n, k // group, generator=g) + 0.5) * spread / 64
        return (torch.randint(-128, 128, (n, k), generator=g).to(torch.int8),
                scales if group == 16 else scales.half(), None)
    return quantize_rtn(torch.randn(n, k, generator=g) * spread, group)


def test_e2m1_codes():
    """Every FP4 code by hand (sign bit 3, 2 exponent bits, 1 mantissa bit) through the torch reference."""
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16)
    got = dequantize(pack(codes), torch.ones(1, 1), None, torch.float32)
    assert got[0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,group,kind", [(1, 32, "int4"), (4, 128, "int4"), (16, 64, "int4"), (19, 128, "int4"), (40, 64, "int4"), (1, 16, "fp4"),
                                          (19, 32, "fp4"), (1, 16, "int8"), (19, 32, "int8"), (40, 16, "int8")])
def test_w4a16_gemm_matches_reference(dtype, m, group, kind):
    from slipstream.kernels.int4 import w4a16_gemm

    g = torch.Generator().manual_seed(m)
    n, k = 80, 256  # N not a multiple of the column tile
    qweight, scales, offsets = packed_weights(kind, n, k, group, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = torch.nn.functional.linear(x.float(), dequantize(qweight, scales, offsets, dtype).float(), bias.float())
    out = w4a16_gemm(x.to(DEV), qweight.to(DEV), scales.to(DEV), None if offsets is None else offsets.to(DEV), group,
                     bias.to(DEV), fp4=kind == "fp4")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("split,kind", [(1, "int4"), (3, "int4"), (8, "int4"), (3, "fp4"), (8, "int8")])
def test_w4a16_decode_slices_add_in_order(monkeypatch, split, kind):
    """The decode GEMM's tiles (a few rows of x) in K slices: the reference's product, the same bits on a second call
    (each tile's last slice adds the slices' sums in slice order and resets the tile's count). (The interpreter runs a
    tile's slices in order, one after another: the GPU test below races them.)"""
    from slipstream.kernels import int4

    monkeypatch.setattr(int4, "DECODE_TILES", dict(BLOCK_N=32, SPLIT_K=split, num_warps=4, num_stages=1))
    g = torch.Generator().manual_seed(split)
    n, k, group = 80, 256, 32  # 8 K steps: 3 slices of 2 and 3 steps, 8 of one
    qweight, scales, offsets = packed_weights(kind, n, k, group, g)
    x = torch.randn(5, k, generator=g).to(torch.float16)
    ref = x.float() @ dequantize(qweight, scales, offsets, torch.float16).float().T
    args = (x.to(DEV), qweight.to(DEV), scales.to(DEV), None if offsets is None else offsets.to(DEV), group)
    out = int4.w4a16_gemm(*args, fp4=kind == "fp4")
    torch.testing.assert_close(out.float().cpu(), ref, atol=TOL[torch.float16] * 10, rtol=TOL[torch.float16])
    assert torch.equal(int4.w4a16_gemm(*args, fp4=kind == "fp4"), out)
    assert not tile_counts(out.device).any()


@pytest.mark.skipif(DEV != "cuda", reason="the slices race only on a GPU")
@pytest.mark.parametrize("rows", [1, 16])
def test_w4a16_decode_tiles_race_to_the_same_bits(monkeypatch, rows):
    """Every tuned decode tile on a GPU, at a shape of many tiles (4,096 x 4,096, groups of 128), launched 50 times:
    whichever slice of a tile ends last, the same bits, the reference's product, and every arrival count back at 0."""
    from slipstream.kernels import int4

    g = torch.Generator().manual_seed(rows)
    n = k = 4096
    qweight, scales, offsets = (t.cuda() for t in packed_weights("int4", n, k, 128, g))
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).cuda()
    ref = x.float() @ dequantize(qweight, scales, offsets, torch.float32).T
    for config in int4.DECODE_CONFIGS:
        monkeypatch.setattr(int4, "DECODE_TILES", dict(config.kwargs, num_warps=config.num_warps,
                                                       num_stages=config.num_stages))
        first = int4.w4a16_gemm(x, qweight, scales, offsets, 128)
        torch.testing.assert_close(first.float(), ref, atol=TOL[torch.bfloat16] * 10, rtol=TOL[torch.bfloat16])
        assert all(torch.equal(int4.w4a16_gemm(x, qweight, scales, offsets, 128), first) for _ in range(50)), config
        assert not tile_counts(x.device).any(), config


@pytest.mark.parametrize("group,kind,dtype", [(32, "int4", torch.float32), (128, "int4", torch.float16),
                                              (16, "fp4", torch.float32), (32, "fp4", torch.float16),
                                              (16, "int8", torch.float16), (32, "int8", torch.float32)]
                         + [(g, kind, torch.bfloat16) for g, kind in ((128, "int4"), (16, "fp4")) if DEV == "cuda"])
def test_dequantize_kernel_matches_reference(group, kind, dtype):
    """The whole-weight dequantization that steps of many rows take (then a 16-bit GEMM): the torch reference's
    weights, rows past the last full tile included, to the last bit of float32's arithmetic rounded once."""
    from slipstream.kernels.int4 import dequantize as dequantize_kernel

    g = torch.Generator().manual_seed(group)
    n, k = 80, 256
    qweight, scales, offsets = packed_weights(kind, n, k, group, g)
    ref = dequantize(qweight, scales, offsets, dtype)
    out = dequantize_kernel(qweight.to(DEV), scales.to(DEV), None if offsets is None else offsets.to(DEV), group, dtype,
                            fp4=kind == "fp4")
    assert out.dtype == dtype and out.shape == (n, k)
    # exact but for a fused multiply-add on the GPU (q * scale + offset rounded once, not twice, in float32)
    torch.testing.assert_close(out.cpu(), ref, atol=0, rtol=2**-22 if dtype == torch.float32 else 0)


@pytest.mark.skipif(DEV != "cuda", reason="the layers run the Triton kernels only on a CUDA device")
def test_layer_past_the_gemm_rows_dequantizes_whole(monkeypatch):
    """A step of more rows than kernels.W4A16_GEMM_ROWS multiplies the whole dequantized weight with cuBLAS: the
    reference's product, as the W4A16 GEMM gives it for a step of W4A16_GEMM_ROWS rows."""
    from slipstream import kernels
    from slipstream.layers.linear import Linear
    from slipstream.layers.quantization import get_linear_method

    torch.manual_seed(0)
    n, k = 384, 512
    linear = Linear(k, n, method=get_linear_method(QuantSpec(method="int4", group=128)), fused=True)
    linear.weight.data.copy_(torch.randn(n, k) / k**0.5)
    linear.method.process_after_loading(linear)
    linear.cuda()
    w = dequantize(linear.qweight.cpu(), linear.scales.cpu(), linear.offsets.cpu(), torch.float32)
    ran = []
    def counted(name: str):  # noqa: ANN202
        run = getattr(kernels, name)
        return lambda *args, **kw: ran.append(name) or run(*args, **kw)
    for name in ("w4a16_gemm", "dequantize_4bit"):
        monkeypatch.setattr(kernels, name, counted(name))
    for m in (kernels.W4A16_GEMM_ROWS, kernels.W4A16_GEMM_ROWS + 1):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float().cpu() @ w.T
        torch.testing.assert_close(linear(x).float().cpu(), ref, atol=3e-2, rtol=2e-2)
    assert ran == ["w4a16_gemm", "dequantize_4bit"]


def test_embedded_q4_1_model_kept_4bit_equals_dequantized(gguf_path):
    """The Q4_1 layers loaded packed (repacked nibbles, Q/K rows unpermuted with their scales), and the Q8_0 tied
    embedding kept 8-bit (the output head's int8 rows and scales, which lookups dequantize), decode to the very
    weights the dequantize-at-load path holds, and give the same greedy tokens."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    packed = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=128, quantization="int4")
    dense = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=128)
    a, b = packed.engine.core.runner.model, dense.engine.core.runner.model
    assert type(a.layers[0].self_attn.qkv_proj.method).__name__ == "Int4"
    assert type(b.layers[0].self_attn.qkv_proj.method).__name__ == "Unquantized"
    assert (a.lm_head.method.bits, a.lm_head.method.group) == (8, 32)
    assert torch.equal(a.embed_tokens.table(), b.embed_tokens.weight)  # (here the head's table, dequantized once)
    assert a.embed_tokens.shape == b.embed_tokens.shape == (49152, 576)  # (what an EAGLE-3 head sharing it checks)
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    wb["lm_head.weight"] = wb.pop("embed_tokens.weight")  # (the tied table is the head's here, the embedding's there)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [o.outputs[0].token_ids for o in packed.generate(prompts, greedy)] == \
        [o.outputs[0].token_ids for o in dense.generate(prompts, greedy)]


FORMS = [(32, "int4"), (128, "int4"), (16, "fp4"), (16, "int8"), (32, "int8")]
PROLOGUES = ["none", "rmsnorm", "silu_mul"]


@pytest.mark.parametrize("prologue,group,kind,rows,dtype",
                         [(p, g, kind, rows, torch.float32) for p in PROLOGUES for g, kind in FORMS for rows in (1, 3)]
                         + [(p, g, kind, 1, torch.float16) for p in PROLOGUES for g, kind in FORMS[1:3]]
                         + [(p, g, kind, rows, torch.bfloat16) for p in PROLOGUES for g, kind in FORMS for rows in (1, 3)
                            if DEV == "cuda"])
def test_4bit_gemv_matches_reference(prologue, group, kind, rows, dtype):
    """One row, or a few, against 4-bit weights (integer or FP4 codes) or GGUF's 8-bit ones: the fused GEMV (the
    norm, with a residual, or SwiGLU before it) vs the dequantized weights; N and K not multiples of the tiles."""
    from slipstream.kernels.matvec import gemv

    g = torch.Generator().manual_seed(group)
    n, k = 77, 288 if 288 % group == 0 else 384  # (neither a multiple of the interpreter's tiles: 8 or 16 by 64)
    x = torch.randn(rows, 2 * k if prologue == "silu_mul" else k, generator=g).to(dtype)
    res = torch.randn(rows, k, generator=g).to(dtype) if prologue == "rmsnorm" else None
    qweight, scales, offsets = packed_weights(kind, n, k, group, g, spread=k**-0.5)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    a = gemv_prologue_ref(x.double() if res is None else x.double() + res.double(), k, nw.double(), prologue)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = a @ dequantize(qweight, scales, offsets, torch.float64).T + bias.double()
    kw = dict(norm_weight=nw.to(DEV), residual=res.to(DEV)) if prologue == "rmsnorm" else {}
    y, res_out = gemv(x.to(DEV), qweight.to(DEV), bias.to(DEV), prologue=prologue, weight_scale=scales.to(DEV),
                      weight_offset=None if offsets is None else offsets.to(DEV), group=group, fp4=kind == "fp4", **kw)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol)
    if res is not None:  # the next block's residual: x + residual, in x's dtype
        torch.testing.assert_close(res_out.cpu(), x + res, rtol=0, atol=0)


@pytest.mark.parametrize("prologue", ["none", "silu_mul"])
def test_4bit_gemv_half_pairs_keep_large_activations(prologue):
    """The one-row 4-bit GEMV's half-precision pairs (f(x) scaled by 2^-8, a word's four products summed in half
    precision) against float64, with a model's massive activations among ordinary ones: outliers of +-20,000 do not
    overflow; a pair of +-200 in columns with equal weights (which cancel exactly) leaves the ordinary part's sum
    within what rounding the outliers to bf16 would cost (so a kernel that lost the ordinary part fails).
    (fp16 activations run the pairs on the CPU, emulated; bf16 as the engine runs them, on the GPU.)"""
    from slipstream.kernels.matvec import gemv

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    g = torch.Generator().manual_seed(7)
    n, k = (1024 if DEV == "cuda" else 16), 4096
    width = 2 * k if prologue == "silu_mul" else k
    qweight, scales, offsets = quantize_rtn(torch.randn(n, k, generator=g) / k**0.5, 128)
    q = unpack(qweight)
    cols = torch.randperm(k // 2, generator=g)[:8] * 2  # pairs (c, c + 1): one group, one word, equal nibbles
    q[:, cols + 1] = q[:, cols]
    qweight = pack(q)
    w = dequantize(qweight, scales, offsets, torch.float64)
    x = torch.randn(1, width, generator=g)
    kw = dict(prologue=prologue, weight_scale=scales.to(DEV), weight_offset=offsets.to(DEV), group=128)
    if prologue == "silu_mul":  # the outliers in `up`, the gate at 1 (silu(1) = 0.73)
        x[0, cols], x[0, cols + 1] = 1.0, 1.0
    ordinary = x.clone()
    at = cols + (k if prologue == "silu_mul" else 0)
    x[0, at], x[0, at + 1] = 20000.0, -20000.0
    assert torch.isfinite(gemv(x.to(dtype).to(DEV), qweight.to(DEV), **kw)[0]).all()
    at = at[:1]  # one pair of +-200 (eight of them would cost, rounded to bf16, as much as the ordinary part)
    x = ordinary.clone()
    x[0, at], x[0, at + 1] = 200.0, -200.0
    y, _ = gemv(x.to(dtype).to(DEV), qweight.to(DEV), **kw)
    ordinary[0, at], ordinary[0, at + 1] = 0.0, 0.0
    ref = gemv_prologue_ref(ordinary.to(dtype).double(), k, None, prologue) @ w.T
    outliers = (gemv_prologue_ref(x.to(dtype).double(), k, None, prologue) - gemv_prologue_ref(
        ordinary.to(dtype).double(), k, None, prologue)).abs() @ w.abs().T
    assert ref.abs().max() > 20 * 2**-8 * outliers.max()  # (the bound below does not cover the ordinary part)
    bound = 2**-8 * outliers + 2**-7 * ref.abs().max()
    assert ((y.cpu().double() - ref).abs() <= bound).all()


def test_4bit_gemv_refuses_weights_it_cannot_read_as_words():
    """The one-row GEMV reads 4-bit integers as int32 words of 8 columns: a weight at an address or with a row stride
    that is not a multiple of 4 bytes, or groups that split a word, are refused by name, not read misaligned."""
    from slipstream.kernels.matvec import gemv

    g = torch.Generator().manual_seed(0)
    qweight, scales, offsets = packed_weights("int4", 16, 256, 32, g, spread=0.1)
    x = torch.randn(1, 256, generator=g)
    shifted = torch.empty(qweight.numel() + 1, dtype=torch.uint8, device=DEV)[1:].view(qweight.shape)
    shifted.copy_(qweight)
    with pytest.raises(ValueError, match="multiples of 4"):
        gemv(x.to(DEV), shifted, weight_scale=scales.to(DEV), weight_offset=offsets.to(DEV), group=32)
    narrow = torch.zeros(16, 130, dtype=torch.uint8, device=DEV)[:, :128]  # a row stride of 130 bytes
    narrow.copy_(qweight)
    with pytest.raises(ValueError, match="multiples of 4"):
        gemv(x.to(DEV), narrow, weight_scale=scales.to(DEV), weight_offset=offsets.to(DEV), group=32)
    q4, s4, o4 = packed_weights("int4", 16, 256, 4, g, spread=0.1)
    with pytest.raises(ValueError, match="multiple of 8"):
        gemv(x.to(DEV), q4.to(DEV), weight_scale=s4.to(DEV), weight_offset=o4.to(DEV), group=4)


def test_awq_and_gptq_words_by_hand():
    """One int32 word 0x76543210 (nibble i holds i): AutoAWQ's GEMM order puts column c in nibble
    (0, 4, 1, 5, 2, 6, 3, 7)[c]; GPTQ packs 8 consecutive input rows (qweight) or columns (qzeros) in order."""
    from slipstream.layers.quantization.int4 import AWQ_NIBBLE, unpack_int32

    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_int32(word, 1, AWQ_NIBBLE).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    assert unpack_int32(word, 1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert unpack_int32(word, 0).tolist() == [[i] for i in range(8)]
    assert unpack_int32(torch.tensor([[-(1 << 31)]], dtype=torch.int32), 1).tolist() == [[0] * 7 + [8]]


def _words(vals, along_rows, order=range(8)):
    """Independent packer, straight from the formats' writers: int values [R, C] -> int32 words, 8 per word along
    rows (GPTQ qweight) or columns (AWQ qweight, qzeros); value j of a word in nibble order[j]."""
    v = np.asarray(vals, dtype=np.int64)
    if along_rows:
        v = v.T
    out = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.int64)
    for c in range(v.shape[1]):
        out[:, c // 8] |= v[:, c] << (4 * list(order)[c % 8])
    out = np.where(out >= 1 << 31, out - (1 << 32), out).astype(np.int32)
    return torch.from_numpy(out.T.copy() if along_rows else out)


def _int4_checkpoint(src, out, fmt, act_order=False):
    """The 16-bit tiny checkpoint's projections as an AWQ / GPTQ checkpoint (group 32, random zero points); returns
    the weights those formats decode to, (q - z) * s, by module."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    t, ref = load_file(os.path.join(src, "model.safetensors")), {}
    g = torch.Generator().manual_seed(7)
    group = 32
    orders = {}  # act-order: projections of one input (q, k, v; gate, up) share their column order, as GPTQ finds it
    for name in [n for n in t if n.endswith("_proj.weight") and ".eh_proj." not in n]:  # (an MTP module's stays 16-bit)
        w = t.pop(name)
        n, k = w.shape
        if fmt in ("nvfp4", "mxfp4"):  # FP4 codes two to a byte, low nibble first; FP8 or E8M0 group scales
            fg = 16 if fmt == "nvfp4" else 32
            codes = torch.randint(0, 16, (n, k), generator=g)
            base = name.removesuffix(".weight")
            cols = torch.arange(k) // fg
            if fmt == "nvfp4":
                s8 = (torch.rand(n, k // fg, generator=g) * 300 + 10).to(torch.float8_e4m3fn)
                glob = torch.tensor([float(torch.randint(200, 3000, (1,), generator=g))])
                scale = s8.float() / glob
                t[base + ".weight_scale"], t[base + ".weight_global_scale"] = s8, glob
                t[base + ".input_global_scale"] = torch.tensor([1.5])
            else:
                e = torch.randint(115, 125, (n, k // fg), generator=g).to(torch.uint8)
                scale, t[base + ".weight_scale"] = torch.exp2(e.float() - 127), e
            ref[base] = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])[codes] * scale[:, cols]
            t[base + ".weight_packed"] = pack(codes)
            continue
        if fmt.startswith("ct"):  # compressed-tensors: signed values and zero points, each stored + 8, rows first
            q = torch.randint(-8, 8, (n, k), generator=g)
            zeros = torch.randint(-8, 8, (n, k // group), generator=g) if fmt == "ct_asym" else torch.zeros(n, k // group, dtype=torch.int64)
            scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).bfloat16()
            cols = torch.arange(k) // group
            ref[name.removesuffix(".weight")] = (q - zeros[:, cols]).float() * scales.float()[:, cols]
            base = name.removesuffix(".weight")
            t[base + ".weight_packed"], t[base + ".weight_scale"] = _words(q + 8, False), scales
            t[base + ".weight_shape"] = torch.tensor([n, k])
            if fmt == "ct_asym":
                t[base + ".weight_zero_point"] = _words(zeros + 8, True)
            continue
        q = torch.randint(0, 16, (k, n), generator=g)
        zeros = torch.randint(1, 15, (k // group, n), generator=g)
        scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
        g_idx = torch.arange(k) // group
        if act_order:
            shared = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            g_idx = g_idx[orders.setdefault(shared, torch.randperm(k, generator=g))]
        ref[name.removesuffix(".weight")] = ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t()
        base = name.removesuffix(".weight")
        if fmt == "awq":
            awq = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's writer: nibble i holds column awq[i]
            where = [awq.index(c) for c in range(8)]
            t[base + ".qweight"], t[base + ".qzeros"] = _words(q, False, where), _words(zeros, False, where)
        else:
            t[base + ".qweight"], t[base + ".qzeros"] = _words(q, True), _words(zeros - 1, False)  # v1: minus one
            t[base + ".g_idx"] = g_idx.int()
        t[base + ".scales"] = scales
    save_file(t, os.path.join(out, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
              "num_bits": 4, "type": "int", "symmetric": fmt == "ct", "strategy": "group", "group_size": group}}}}
    if fmt in ("nvfp4", "mxfp4"):
        ct["format"] = f"{fmt}-pack-quantized"
        ct["config_groups"]["group_0"]["weights"] = {"num_bits": 4, "type": "float", "symmetric": True,
                                                     "strategy": "tensor_group" if fmt == "nvfp4" else "group",
                                                     "group_size": 16 if fmt == "nvfp4" else 32}
        if fmt == "nvfp4":  # written as a W4A4 checkpoint: its input scales are read past
            ct["config_groups"]["group_0"]["input_activations"] = {"num_bits": 4, "type": "float", "dynamic": "local",
                                                                   "strategy": "tensor_group", "group_size": 16}
    cfg["quantization_config"] = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
                                  if fmt == "awq" else ct if fmt.startswith("ct") or fmt.endswith("fp4") else
                                  {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False})
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), out)
    return ref


@pytest.mark.parametrize("fmt,act_order", [("awq", False), ("gptq", False), ("gptq", True), ("ct", False), ("ct_asym", False),
                                           ("nvfp4", False), ("mxfp4", False)])
def test_awq_gptq_checkpoints_load_to_their_weights(tmp_path, fmt, act_order):
    """Checkpoints packed by hand in each format load to the weights the format defines, bit for bit (GPTQ with
    act-order's shuffled g_idx too; compressed-tensors pack-quantized, symmetric and with zero points; NVFP4 with a
    global scale per projection, MXFP4), fused q|k|v and gate|up included."""
    from test_fp8 import _tiny_llama

    src = str(tmp_path / "src")
    _tiny_llama(src)
    ref = _int4_checkpoint(src, str(tmp_path / fmt), fmt, act_order)
    llm = LLM(str(tmp_path / fmt), dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    model = llm.engine.core.runner.model
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.cat([ref[p + "self_attn." + x] for x in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(model.layers[i].self_attn.qkv_proj.weight, qkv)
        assert torch.equal(model.layers[i].mlp.gate_up_proj.weight, torch.cat([ref[p + "mlp.gate_proj"], ref[p + "mlp.up_proj"]]))
        assert torch.equal(model.layers[i].mlp.down_proj.weight, ref[p + "mlp.down_proj"])
    assert len(llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids) == 4


def test_parse_awq_gptq_configs():
    from slipstream.layers.quantization import parse_quantization_config as parse

    assert parse({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM"}) == \
        QuantSpec("int4", serialized=True, group=64, format="awq")
    assert parse({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": True,
                  "checkpoint_format": "gptq_v2"}).format == "gptq_v2"

    def ct(act=None, **weights):
        w = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128) | weights
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                "config_groups": {"g": {"weights": w, "input_activations": act}}}

    assert parse(ct()) == QuantSpec("int4", serialized=True, group=128, format="ct", ignore=("lm_head",))
    assert parse(ct(symmetric=False, strategy="channel", group_size=None)).format == "ct_asym"
    assert parse(ct(strategy="channel")).group == -1
    for bad, field in ((ct(actorder="group"), "act-order"), (ct(act={"num_bits": 8}), "weight-only"),
                       (ct(strategy="tensor"), "strategy 'tensor'")):
        with pytest.raises(ValueError, match=field):
            parse(bad)
    nv = ct(act={"num_bits": 4, "type": "float"}, type="float", strategy="tensor_group", group_size=16)
    nv["format"] = "nvfp4-pack-quantized"
    # W4A4 (it holds input scales, read past) and W4A16
    assert parse(nv) == QuantSpec("int4", serialized=True, group=16, format="nvfp4", ignore=("lm_head",), activations="static")
    nv["config_groups"]["g"]["input_activations"] = None
    assert parse(nv) == QuantSpec("int4", serialized=True, group=16, format="nvfp4", ignore=("lm_head",))
    mx = ct(type="float", group_size=32)
    mx["format"] = "mxfp4-pack-quantized"
    assert parse(mx).format == "mxfp4"
    mx["config_groups"]["g"]["weights"]["group_size"] = 16
    with pytest.raises(ValueError, match="groups of 32"):
        parse(mx)
    for bad, field in (({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8 bits"),
                       ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "GEMM layout"),
                       ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format")):
        with pytest.raises(ValueError, match=field):
            parse(bad)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_quantize_writes_4bit_checkpoints_that_round_trip(tmp_path, fmt):
    """`slipstream quantize --format awq|gptq`: the checkpoint loads to (q - zero) * scale of its own rounding,
    within a step of the 16-bit weights (half a step inside the grid; the integer zero point shifts the grid by up to
    half a step, which the range's ends can meet)."""
    from test_fp8 import _tiny_llama

    from slipstream.cli import main
    from slipstream.layers.quantization.int4 import quantize_zero_point

    src, out = str(tmp_path / "src"), str(tmp_path / fmt)
    t = _tiny_llama(src)
    main(["quantize", src, "--out", out, "--format", fmt, "--group-size", "64"])
    llm = LLM(out, dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    down = llm.engine.core.runner.model.layers[1].mlp.down_proj
    w = t["model.layers.1.mlp.down_proj.weight"]
    q, zeros, scales = quantize_zero_point(w, 64, min_zero=1 if fmt == "gptq" else 0)
    n, k = w.shape
    expected = ((q.view(n, k // 64, 64) - zeros[..., None]).float() * scales.float()[..., None]).view(n, k)
    assert torch.equal(down.weight, expected)
    err = (down.weight - w).abs().view(n, k // 64, 64) / scales.float()[..., None]
    assert err.max() <= 1 + 1e-3 and err.mean() < 0.3
    assert llm.generate(["w5 w6"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o644  # readable as the other files
    # without --group-size: 128 where every input width allows, else the largest of 64 and 32 that does; a run that
    # fails leaves no directory behind
    main(["quantize", src, "--out", out + "-auto", "--format", fmt])
    assert json.load(open(os.path.join(out + "-auto", "config.json")))["quantization_config"]["group_size"] == 128
    with pytest.raises(SystemExit):  # ("... needs input widths that are multiples of the group (48; ...)")
        main(["quantize", src, "--out", out + "-bad", "--format", fmt, "--group-size", "48"])
    assert not os.path.exists(out + "-bad")


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    """GPTQ moves each column's rounding error onto the columns after it: on inputs with correlated features the
    layer's output error ||X (W - Q)^T|| falls well below round-to-nearest's on the same grid."""
    from slipstream.loader.quantize import gptq
    from slipstream.layers.quantization.int4 import quantize_zero_point

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 128, generator=g)  # 128 features of rank 32
    w = torch.randn(64, 128, generator=g) / 128**0.5
    h = x.double().T @ x.double() / x.shape[0]

    def out_err(q, zeros, scales):
        deq = ((q.view(64, 2, 64) - zeros[..., None]).float() * scales.float()[..., None]).view(64, 128)
        return ((x @ (w - deq).T).norm() / (x @ w.T).norm()).item()

    rtn, ours = out_err(*quantize_zero_point(w, 64)), out_err(*gptq(w, h, 64)[:3])
    assert ours < 0.7 * rtn, (ours, rtn)
    q, zeros, scales, g_idx = gptq(w, h, 64, act_order=True)  # groups in order of input energy: g_idx says which
    deq = (q - zeros[:, g_idx.long()]).float() * scales.float()[:, g_idx.long()]
    assert ((x @ (w - deq).T).norm() / (x @ w.T).norm()).item() < 0.7 * rtn
    assert sorted(torch.bincount(g_idx).tolist()) == [64, 64]


def test_q4_k_blocks_equal_the_gguf_package():
    """Random Q4_K super-blocks (d, dmin, eight packed 6-bit scales and minimums, 128 bytes of nibbles): our
    per-sub-block scale and offset in float32 dequantize to the gguf package's values, bit for bit."""
    from slipstream.loader.gguf_loader import q4k_blocks

    rng = np.random.default_rng(1)
    rows, cols = 3, 512
    blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = np.array([0.01, 0.003], dtype=np.float16).view(np.uint8)  # d, dmin: ordinary magnitudes
    data = blocks.reshape(rows, -1)
    q, scale, offset = q4k_blocks(data, rows, cols)
    got = dequantize(pack(torch.from_numpy(np.ascontiguousarray(q))), torch.from_numpy(scale), torch.from_numpy(offset),
                     torch.float32)
    assert torch.equal(got, torch.from_numpy(gguf_dequantize(data, GGMLQuantizationType.Q4_K)))


def _random_blocks(rng, kind, n, k):
    """Random super-blocks where the gguf package cannot quantize (Q4_K, Q5_K, Q6_K), with small d (and dmin)."""
    if kind in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):  # d, dmin first
        blocks = rng.integers(0, 256, (n, k // 256, 144 if kind == GGMLQuantizationType.Q4_K else 176), dtype=np.uint8)
        blocks[..., 0:4] = np.array([0.002, 0.0005], dtype=np.float16).view(np.uint8)
    else:  # Q6_K: the 6-bit q times d * sc with sc in -128..127: |w| up to 4096 d
        blocks = rng.integers(0, 256, (n, k // 256, 210), dtype=np.uint8)
        blocks[..., 208:210] = np.array([0.5 / 4096 / k**0.5], dtype=np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def _tiny_gguf(path, types):
    """A random two-layer Llama GGUF whose projections (and token_embd / output) have the given block types."""
    import gguf

    rng = np.random.default_rng(2)
    hidden, inter, heads, kv, vocab = 256, 512, 4, 2, 384
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_context_length(256)
    w.add_vocab_size(vocab)
    def add(name, n, k, kind, scale):
        kind = GGMLQuantizationType[kind]
        if kind == GGMLQuantizationType.F32:
            w.add_tensor(name, (rng.standard_normal((n, k)) * scale).astype(np.float32))
        elif kind in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K):
            w.add_tensor(name, _random_blocks(rng, kind, n, k), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf_quantize((rng.standard_normal((n, k)) * scale).astype(np.float32), kind), raw_dtype=kind)

    add("token_embd.weight", vocab, hidden, types.get("token_embd", "F32"), 1.0)
    add("output.weight", vocab, hidden, types.get("output", "F32"), 1 / 16)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv * 64, hidden), "attn_v": (kv * 64, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for layer in range(2):
        for part, (n, k) in shapes.items():
            add(f"blk.{layer}.{part}.weight", n, k, types[part], k**-0.5)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mixed_gguf_keeps_its_4bit_layers(tmp_path):
    """A Q4_K_M-like mix: q, k, v in Q4_K (float32 scales, Q/K rows unpermuted with them), o in Q4_0, gate Q4_1 with
    up in Q8_0 (their fused layer 8-bit), down Q4_K, the embedding Q4_K (loaded dense): the 4-bit run holds exactly the dequantizing run's weights
    and draws the same greedy tokens."""
    from slipstream.bench.common import _synthetic_tokenizer

    path, tok = str(tmp_path / "mix.gguf"), str(tmp_path / "tok")
    _tiny_gguf(path, {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
                      "ffn_up": "Q8_0", "ffn_down": "Q4_K", "token_embd": "Q4_K"})
    _synthetic_tokenizer(384, 2, tok)
    kw = dict(tokenizer=tok, dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    packed, dense = LLM(path, quantization="int4", **kw), LLM(path, **kw)
    a, b = packed.engine.core.runner.model, dense.engine.core.runner.model
    kinds = {name: type(a.layers[0].get_submodule(name).method).__name__
             for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert kinds == {"self_attn.qkv_proj": "Int4", "self_attn.o_proj": "Int4", "mlp.gate_up_proj": "Int4",
                     "mlp.down_proj": "Int4"}
    wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    assert packed.generate(["w5 w6 w7"], greedy)[0].outputs[0].token_ids == dense.generate(["w5 w6 w7"], greedy)[0].outputs[0].token_ids


def test_wide_blocks_equal_the_gguf_package():
    """Every kind kept 8-bit (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 quantized by the gguf package; random Q5_K, Q4_K and Q6_K
    super-blocks), in groups of 32 and repeated to 16, with offsets and (where the kind has none) without: q * scale +
    offset in float32 gives the gguf package's values, bit for bit; kinds with offsets refuse to go without."""
    from slipstream.loader.gguf_loader import wide_blocks

    rng = np.random.default_rng(5)
    rows, cols = 6, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = {kind: gguf_quantize(w, GGMLQuantizationType[kind]) for kind in ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")}
    data.update({kind: _random_blocks(rng, GGMLQuantizationType[kind], rows, cols) for kind in ("Q5_K", "Q4_K", "Q6_K")})
    bits = {"Q8_0": (-127, 127), "Q5_0": (-16, 15), "Q5_1": (0, 31), "Q4_0": (-8, 7), "Q4_1": (0, 15), "Q5_K": (0, 31),
            "Q4_K": (0, 15), "Q6_K": (-32, 31)}
    for kind, blocks in data.items():
        want = torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType[kind]))
        for group in (16,) if kind == "Q6_K" else (32, 16):
            for offsets in (False, True):
                if not offsets and kind in ("Q5_1", "Q4_1", "Q5_K", "Q4_K"):
                    with pytest.raises(ValueError, match="need offsets"):
                        wide_blocks(blocks, kind, rows, cols, group, offsets, np.float32)
                    continue
                q, scale, offset = (None if a is None else torch.from_numpy(np.ascontiguousarray(a))
                                    for a in wide_blocks(blocks, kind, rows, cols, group, offsets, np.float32))
                assert q.dtype == torch.int8 and scale.shape == (rows, cols // group) and (offset is not None) == offsets
                assert torch.equal(dequantize(q, scale, offset, torch.float32), want), (kind, group, offsets)
                assert (int(q.min()), int(q.max())) == bits[kind]


GGUF_MIXES = {  # a projection's kinds, as llama.cpp's mixes hold them (q | k | v and gate | up: one layer each)
    # Q4_K_M-like: q, k in Q4_K with v in Q6_K (one 8-bit layer, offsets for the Q4_K parts); down in Q6_K (8-bit, its
    # zero offsets dropped); gate, up in Q4_K (4-bit); the output Q6_K (8-bit), the embedding Q4_K (dense)
    "q4_k_m": ({"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
                "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q4_K", "output": "Q6_K"},
               {"self_attn.qkv_proj": (8, 16, True), "self_attn.o_proj": (4, 32, True), "mlp.gate_up_proj": (4, 32, True),
                "mlp.down_proj": (8, 16, False)}),
    # Q5 kinds, Q8_0, and a Q4_1 / Q8_0 pair (one 8-bit layer): no Q6_K, so groups of 32 (float32 for Q5_K)
    "q5": ({"attn_q": "Q5_K", "attn_k": "Q5_K", "attn_v": "Q5_K", "attn_output": "Q5_0", "ffn_gate": "Q4_1",
            "ffn_up": "Q8_0", "ffn_down": "Q5_1", "token_embd": "Q8_0", "output": "Q5_K"},
           {"self_attn.qkv_proj": (8, 32, True), "self_attn.o_proj": (8, 32, False), "mlp.gate_up_proj": (8, 32, True),
            "mlp.down_proj": (8, 32, True)}),
    # 8-bit kinds beside 4-bit ones: Q8_0 / Q6_K (no offsets at all)
    "q8": ({"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q4_0",
            "ffn_up": "Q4_0", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q6_K"},
           {"self_attn.qkv_proj": (8, 16, False), "self_attn.o_proj": (4, 32, True), "mlp.gate_up_proj": (4, 32, True),
            "mlp.down_proj": (8, 16, False)}),
}


def test_gguf_projections_of_other_kinds_are_rounded(tmp_path):
    """Beside kept layers, a projection of a kind slipstream does not keep (F32 here; F16, Q2_K, Q3_K alike) loads
    dequantized and `int4` rounds it to 4 bits at load, as a 16-bit checkpoint's (it stayed 16-bit); a GGUF that
    `slipstream quantize` reads loads dequantized whole (it refused GGUFs with kept blocks)."""
    from slipstream.bench.common import _synthetic_tokenizer
    from slipstream.loader.quantize import _source

    path, tok = str(tmp_path / "m.gguf"), str(tmp_path / "tok")
    _tiny_gguf(path, {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q8_0", "ffn_gate": "Q4_1",
                      "ffn_up": "Q4_1", "ffn_down": "F32"})
    _synthetic_tokenizer(384, 2, tok)
    kw = dict(tokenizer=tok, dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    packed, dense = LLM(path, quantization="int4", **kw), LLM(path, **kw)
    a, b = packed.engine.core.runner.model, dense.engine.core.runner.model
    down = a.layers[0].mlp.down_proj
    assert (down.method.bits, down.method.spec.serialized, a.layers[0].self_attn.o_proj.method.bits) == (4, False, 8)
    w = b.layers[0].mlp.down_proj.weight
    assert torch.equal(down.weight, dequantize(*quantize_rtn(w, down.method.group), torch.float32))
    assert packed.generate(["w5 w6"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="give one with --tokenizer"):  # (this file holds no tokenizer)
        LLM(path, **{k: v for k, v in kw.items() if k != "tokenizer"})
    loaded, _ = _source(None)  # the embedded Q4_1 GGUF: `slipstream quantize` reads its weights dequantized
    assert any(name == "model.layers.0.mlp.down_proj.weight" for name, _ in loaded.weights(False))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if DEV == "cuda" else []))
@pytest.mark.parametrize("mix", list(GGUF_MIXES))
def test_gguf_keeps_its_5_to_8bit_layers(tmp_path, mix, device):
    """Projections of 5-, 6- and 8-bit blocks, and layers fusing those with 4-bit ones, stay 8-bit (one byte a weight,
    a scale and where the kinds have them an offset per group; Q/K rows unpermuted with them) beside 4-bit layers, and
    so does the output head; the (untied) embedding loads dense. The run holds exactly the dequantizing run's weights
    (on the CPU, where both are dequantized; on a GPU the kernels read the packed ones) and draws its greedy tokens."""
    from slipstream.bench.common import _synthetic_tokenizer

    types, want = GGUF_MIXES[mix]
    path, tok = str(tmp_path / f"{mix}.gguf"), str(tmp_path / "tok")
    _tiny_gguf(path, types)
    _synthetic_tokenizer(384, 2, tok)
    kw = dict(tokenizer=tok, dtype="float32", device=device, max_model_len=128, num_blocks=32, block_size=16)
    if device == "cuda":
        kw.update(gpu_memory_utilization=0.3)
    packed, dense = LLM(path, quantization="int4", **kw), LLM(path, **kw)
    a, b = packed.engine.core.runner.model, dense.engine.core.runner.model
    layers = {name: a.layers[0].get_submodule(name) for name in want}
    assert {name: (m.method.bits, m.method.group) for name, m in layers.items()} == {k: v[:2] for k, v in want.items()}
    assert a.lm_head.method.bits == 8
    if device == "cpu":
        wa, wb = dict(a.named_parameters()), dict(b.named_parameters())
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    else:  # the forms the kernels read: offsets only where the kinds have them
        assert {name: (m.qweight.dtype, m.offsets is not None) for name, m in layers.items()} == {
            k: (torch.int8 if v[0] == 8 else torch.uint8, v[2]) for k, v in want.items()}
    greedy = SamplingParams(max_tokens=6, temperature=0)
    assert packed.generate(["w5 w6 w7"], greedy)[0].outputs[0].token_ids == dense.generate(["w5 w6 w7"], greedy)[0].outputs[0].token_ids


def test_gguf_index_reads_what_ggufs_reader_reads(gguf_path, tmp_path):
    """Our one-pass GGUF index against the gguf package's reader: every tensor (name, shape, type, bytes) and every
    metadata value (arrays as their length), on the embedded model and on a file of other block types, F16 tensors
    and string, integer and nested arrays."""
    import gguf

    from slipstream.loader.gguf_loader import GGUFIndex

    mixed = str(tmp_path / "mixed.gguf")
    types = dict(attn_q="Q4_K", attn_k="Q4_K", attn_v="Q4_K", attn_output="Q4_0", ffn_gate="Q4_1", ffn_up="Q8_0",
                 ffn_down="Q4_K")
    _tiny_gguf(mixed, types)
    extra = str(tmp_path / "extra.gguf")
    w = gguf.GGUFWriter(extra, "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "c" * 300])
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("test.text", "héllo")
    w.add_float32("test.f", 0.25)
    w.add_bool("test.b", True)
    w.add_tensor("x.weight", np.arange(12, dtype=np.float16).reshape(3, 4))
    w.add_tensor("y.weight", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path in (gguf_path, mixed, extra):
        ours, theirs = GGUFIndex(path), gguf.GGUFReader(path)
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors):
            assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name
        fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert set(ours.fields) == set(fields)
        for k, v in fields.items():
            if k != "test.nested":  # gguf flattens an array of arrays; ours counts the outer one (2, checked below)
                assert ours.fields[k] == (len(v) if isinstance(v, list) else v), k
    assert ours.fields["test.nested"] == 2 and ours.fields["test.text"] == "héllo"
    cut = tmp_path / "cut.gguf"  # an interrupted download
    cut.write_bytes(open(mixed, "rb").read()[:-1000])
    with pytest.raises(ValueError, match="is truncated: tensor"):
        GGUFIndex(str(cut))
    cut.write_bytes(open(gguf_path, "rb").read()[:100_000])  # cut inside the header (the tokenizer's vocabulary)
    with pytest.raises(ValueError, match="is truncated: its header"):
        GGUFIndex(str(cut))


def test_e2m1_rounding_is_to_the_nearest_value():
    from slipstream.layers.quantization.int4 import E2M1
    from slipstream.loader.quantize import e2m1_codes

    x = torch.randn(4000, generator=torch.Generator().manual_seed(3)) * 3
    got = E2M1[e2m1_codes(x)]
    best = (x.clamp(-6, 6)[:, None] - E2M1[None, :]).abs().min(dim=1).values
    assert torch.allclose((x.clamp(-6, 6) - got).abs(), best)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_checkpoints_written_here_load_to_their_values(tmp_path, fmt):
    """`slipstream quantize --format nvfp4|mxfp4`: the engine loads each projection to the values the written
    tensors define (decoded here by the formats' rules), and those are the source weights to within FP4's rounding;
    no input scales are written (W4A16) and the model still answers."""
    from safetensors.torch import load_file

    from slipstream import cli
    from test_fp8 import _tiny_llama

    src, out = str(tmp_path / "src"), str(tmp_path / fmt)
    _tiny_llama(src)
    cli.main(["quantize", src, "--out", out, "--format", fmt])
    t, orig = load_file(f"{out}/model.safetensors"), load_file(f"{src}/model.safetensors")
    assert not any(n.endswith("input_global_scale") for n in t)
    cfg = json.load(open(f"{out}/config.json"))["quantization_config"]
    assert cfg["format"] == f"{fmt}-pack-quantized" and cfg["config_groups"]["group_0"]["input_activations"] is None
    group = 16 if fmt == "nvfp4" else 32
    ref, errors = {}, []
    for name in [n.removesuffix(".weight_packed") for n in t if n.endswith(".weight_packed")]:
        codes = unpack(t[name + ".weight_packed"]).long()
        s = t[name + ".weight_scale"]
        scale = s.float() / t[name + ".weight_global_scale"] if fmt == "nvfp4" else torch.exp2(s.float() - 127)
        ref[name] = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])[codes] * scale.repeat_interleave(group, 1)
        w = orig[name + ".weight"]
        errors.append(float((ref[name] - w).norm() / w.norm()))
    assert max(errors) < 0.15, errors  # E2M1's 8 magnitudes per group: ~10% relative error on Gaussian weights
    llm = LLM(out, dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    model = llm.engine.core.runner.model
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.cat([ref[p + "self_attn." + x] for x in ("q_proj", "k_proj", "v_proj")])
        assert torch.allclose(model.layers[i].self_attn.qkv_proj.weight, qkv, rtol=1e-6, atol=0)
        assert torch.allclose(model.layers[i].mlp.down_proj.weight, ref[p + "mlp.down_proj"], rtol=1e-6, atol=0)
    assert len(llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids) == 4


def _int4_dequantized(spec: QuantSpec, weights: dict):  # noqa: ANN202
    """One projection's weight as the dense 4-bit linear method reads it from the checkpoint's tensors (the MoE
    layer's staging is checked against it)."""
    from slipstream.layers.linear import Linear
    from slipstream.layers.quantization import get_linear_method

    def dequantized(stored: dict, module: str) -> torch.Tensor:
        n, k = weights[f"{module}.weight"].shape
        linear = Linear(k, n, method=get_linear_method(spec))
        for name, t in stored.items():
            if name.startswith(module + "."):
                p = getattr(linear, name.removeprefix(module + "."))
                p.weight_loader(p, t, None)
        linear.method.process_after_loading(linear)
        return linear.weight.data
    return dequantized


@pytest.mark.parametrize("fmt, arch", [("awq", "glm4_moe"), ("gptq", "qwen3_moe"), ("ct", "qwen3_moe"),
                                       ("ct_asym", "glm4_moe"), ("nvfp4", "qwen3_moe"), ("mxfp4", "qwen3_moe")])
def test_4bit_moe_checkpoints(tmp_path, fmt, arch):
    """4-bit MoE checkpoints packed by hand in each format (experts, shared experts, an MTP module's) load with
    4-bit experts; with only the experts 4-bit, the engine computes exactly what it computes for the 16-bit model
    holding the weights the format defines. GLM-4.5: its 4-bit MTP module drafts without changing the output."""
    from test_fp8 import GREEDY, PROMPTS, _experts, _llm, _tiny_moe, check_experts_only

    src, out = tmp_path / "src", str(tmp_path / fmt)
    weights = _tiny_moe(src, arch)
    decoded = _int4_checkpoint(str(src), out, fmt)
    llm = _llm(out)
    moe = _experts(llm, 1)
    assert moe.w13.dtype == torch.uint8 and moe.quant.w13_group == {"nvfp4": 16}.get(fmt, 32)
    greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert all(len(x) == 12 for x in greedy)
    if arch == "glm4_moe":
        mtp = _llm(out, speculative_method="mtp", num_speculative_tokens=2)
        assert mtp.engine.core.proposer.runner.head.mtp_block.mlp.w13.dtype == torch.uint8
        drafted = [o.outputs[0].token_ids for o in mtp.generate(PROMPTS, GREEDY)]
        # (on a GPU the 4-bit GEMM of a verifying step, more rows, accumulates in another order: a near-tie may flip)
        assert drafted == greedy if DEV == "cpu" else all(len(x) == 12 for x in drafted)
    check_experts_only(out, tmp_path, weights, lambda stored, module: decoded[module], torch.uint8)


def test_online_int4_quantizes_moe_experts(tmp_path):
    """--quantization int4 on a 16-bit MoE model: its experts too, per group of 128 columns (round-to-nearest)."""
    from test_fp8 import PROMPTS, GREEDY, _experts, _llm, _tiny_moe

    weights = _tiny_moe(tmp_path, "qwen3_moe")
    llm = _llm(str(tmp_path), quantization="int4")
    moe = _experts(llm, 1)
    assert moe.w13.dtype == torch.uint8 and moe.quant.w13_group == 128
    for e in (0, 3):
        got = dequantize(moe.w13[e], moe.quant.w13_scales[e], moe.quant.w13_offsets[e], torch.float32).cpu()
        want = torch.cat([weights[f"model.layers.1.mlp.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj")])
        assert (got - want).norm() / want.norm() < 0.1
    assert all(len(o.outputs[0].token_ids) == 12 for o in llm.generate(PROMPTS, GREEDY))
    from slipstream.loader.quantize import write_int4_checkpoint

    with pytest.raises(ValueError, match="algorithm rtn"):
        write_int4_checkpoint(str(tmp_path), str(tmp_path / "gptq"), "gptq", 64, "gptq", ["t5 t6 t7"])


def test_quantize_lm_head_int4(tmp_path, gguf_path):
    """With 4-bit weights, quantize_lm_head rounds a 16-bit head to 4 bits per group of 128 columns (as the layers
    are rounded at load), and a 16-bit draft model keeps its own head 16-bit; a GGUF file's 8-bit head stays as
    stored."""
    from test_fp8 import GREEDY, PROMPTS, _llm, _tiny_llama

    weights = _tiny_llama(str(tmp_path))
    llm = _llm(str(tmp_path), quantization="int4", quantize_lm_head=True, speculative_method="draft",
               speculative_model=str(tmp_path))
    head = llm.engine.core.runner.model.lm_head
    assert type(head.method).__name__ == "Int4" and head.method.group == 128
    q, s, o = quantize_rtn(weights["lm_head.weight"], 128)
    want = dequantize(q, s, o, torch.float32)
    got = head.weight if DEV == "cpu" else dequantize(head.qweight, head.scales, head.offsets, torch.float32)
    assert torch.equal(got.cpu(), want)
    assert type(llm.engine.core.proposer.runner.model.lm_head.method).__name__ == "Unquantized"
    assert all(len(o.outputs[0].token_ids) == 12 for o in llm.generate(PROMPTS, GREEDY))
    kept = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=64, quantization="int4", quantize_lm_head=True)
    assert (kept.engine.core.runner.model.lm_head.method.bits, kept.engine.core.runner.model.lm_head.method.group) == (8, 32)


def test_awq_model_dirs_keep_what_groups_cannot_cut(tmp_path):
    """A benchmark's 4-bit (AWQ) directory of GLM-4.5-Air's form: its dense first layer's 10,944-wide down projection
    (here 200 wide) cannot be grouped by 128, so the checkpoint lists it as not converted, as a quantizer leaves it;
    the model loads (it did not: `int4 weights need the input width ... to be a multiple of the group`) and runs."""
    from importlib import resources

    from slipstream.bench.common import AWQ_4BIT, model_dir

    cfg = json.loads(resources.files("slipstream.configs").joinpath("glm-4.5-air.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=200, moe_intermediate_size=128, n_routed_experts=4,
               num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               vocab_size=512, eos_token_id=[1], num_nextn_predict_layers=0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = model_dir(str(tmp_path / "config.json"), AWQ_4BIT)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["quantization_config"]["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj"]
    llm = LLM(path, load_format="dummy", device="cpu", dtype="float32", max_model_len=128)
    assert len(llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids) == 4
    cfg["intermediate_size"] = 256  # a width the group divides: nothing kept 16-bit
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with open(os.path.join(model_dir(str(tmp_path / "config.json"), AWQ_4BIT), "config.json")) as f:
        assert "modules_to_not_convert" not in json.load(f)["quantization_config"]
