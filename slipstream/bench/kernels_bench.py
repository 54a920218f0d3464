"""Kernels against their limits in one run, Llama-3.1-8B shapes: prefill attention TFLOP/s vs torch SDPA (causal,
2K/8K/32K), decode attention GB/s vs the measured copy bandwidth (batch 1/16/64 x 1K/4K/16K), and the fused
batch-1 decode projections (GEMV) vs the unfused kernels + cuBLAS, with FP8 weights too; the FP8 GEMM vs cuBLAS
bf16 and cuBLASLt FP8 (`torch._scaled_mm`) on the 8B model's projections; the fused MoE layer (Qwen3-30B-A3B
shape) vs torch's grouped GEMM; 4-bit weights (W4A16) vs bf16 on the 8B projections by rows per step."""
from __future__ import annotations

import argparse
import itertools
import json
from importlib import resources

import torch
import triton

from slipstream.attention.backend import quantize_kv
from slipstream.bench.common import copy_bandwidth, gpu_name, graph_us, matmul_rate, table
from slipstream.config import CacheConfig, ModelConfig
from slipstream.kernels.activation import silu_and_mul
from slipstream.kernels.attention import decode_splits, paged_decode, paged_prefill
from slipstream.kernels.fp8 import fp8_gemm, quantize_fp8
from slipstream.kernels.int4 import dequantize, w4a16_gemm
from slipstream.kernels._device import LAYER_GEMV_ROWS, W4A16_GEMM_ROWS
from slipstream.kernels.matvec import gemv
from slipstream.kernels.moe import GEMV_TOKENS, Fp8Experts, Int4Experts, default_tiles, fused_moe
from slipstream.kernels.rmsnorm import fused_add_rms_norm
from slipstream.layers.quantization.fp8 import quantize_weight_blocks
from slipstream.layers.quantization.int4 import quantize_rtn

HQ, HK, D, PAGE = 32, 8, 128, CacheConfig.block_size
HIDDEN, FFN, VOCAB = 4096, 14336, 128256
# name, N, K, fused prologue
PROJECTIONS = [("qkv", (HQ + 2 * HK) * D, HIDDEN, "rmsnorm"), ("o_proj", HIDDEN, HQ * D, "none"),
               ("gate_up", 2 * FFN, HIDDEN, "rmsnorm"), ("down", HIDDEN, FFN, "silu_mul"), ("lm_head", VOCAB, HIDDEN, "none")]


def _paged(ctx: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pages = triton.cdiv(ctx, PAGE)
    k = torch.randn(batch * pages + 1, PAGE, HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)  # scattered pages
    return k, v, tables


def _ms(fn) -> float:  # noqa: ANN001
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def run(a: argparse.Namespace) -> dict:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    bw = copy_bandwidth(dev)
    mm = matmul_rate(dev)
    res: dict = dict(bench="kernels", gpu=gpu_name(), copy_bw_Bps=bw, matmul_flops=mm, prefill=[], decode=[])
    rows = [["prefill (causal)", "slipstream TFLOP/s", "torch SDPA TFLOP/s", "ratio", "% of matmul rate"]]
    for ctx in a.prefill_lens:
        k, v, tables = _paged(ctx, 1, dtype)
        q = torch.randn(ctx, HQ, D, device="cuda", dtype=dtype)
        seq_lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
        qsl = torch.tensor([0, ctx], device="cuda", dtype=torch.int32)
        ours = _ms(lambda: paged_prefill(q, k, v, tables, seq_lens, qsl, ctx, D**-0.5))
        qs = torch.randn(1, HQ, ctx, D, device="cuda", dtype=dtype)
        ks = torch.randn(1, HK, ctx, D, device="cuda", dtype=dtype)
        vs = torch.randn_like(ks)
        sdpa = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        flops = 4 * HQ * D * ctx * ctx / 2  # QK^T and PV over the causal half
        r = dict(ctx=ctx, ours_tflops=flops / ours / 1e9, sdpa_tflops=flops / sdpa / 1e9)
        res["prefill"].append(r)
        rows.append([f"{ctx // 1024}K", f"{r['ours_tflops']:.0f}", f"{r['sdpa_tflops']:.0f}", f"{r['ours_tflops'] / r['sdpa_tflops']:.2f}",
                     f"{100 * r['ours_tflops'] * 1e12 / mm:.0f}"])
        del k, v, q, qs, ks, vs
    print(table(rows))
    # the same decode on an FP8 pool (--kv-cache-dtype fp8): E4M3 rows and a float32 scale per token and head
    rows = [["decode", "slipstream GB/s", "% of copy bandwidth", "us", "FP8 KV % of copy bandwidth", "FP8 KV us"]]
    for batch in a.decode_batches:
        for ctx in a.decode_lens:
            k, v, tables = _paged(ctx, batch, dtype)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=dtype)
            seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            splits = decode_splits(batch, HK, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
            ms = _ms(lambda: paged_decode(q, k, v, tables, seq_lens, splits, D**-0.5))
            nbytes = 2 * batch * ctx * HK * D * k.element_size() + 2 * q.numel() * q.element_size()
            (k8, ks), (v8, vs) = (quantize_kv(c.flatten(0, 1)) for c in (k, v))
            del k, v
            k8, v8, scales = k8.view(-1, PAGE, HK, D), v8.view(-1, PAGE, HK, D), (ks.view(-1, PAGE, HK), vs.view(-1, PAGE, HK))
            ms8 = _ms(lambda: paged_decode(q, k8, v8, tables, seq_lens, splits, D**-0.5, kv_scales=scales))
            nbytes8 = 2 * batch * ctx * HK * (D + 4) + 2 * q.numel() * q.element_size()
            r = dict(batch=batch, ctx=ctx, us=ms * 1e3, GBps=nbytes / ms / 1e6, pct_copy_bw=100 * nbytes / ms / 1e-3 / bw,
                     fp8_us=ms8 * 1e3, fp8_pct_copy_bw=100 * nbytes8 / ms8 / 1e-3 / bw)
            res["decode"].append(r)
            rows.append([f"B={batch} x {ctx // 1024}K", f"{r['GBps']:.0f}", f"{r['pct_copy_bw']:.0f}", f"{r['us']:.1f}",
                         f"{r['fp8_pct_copy_bw']:.0f}", f"{r['fp8_us']:.1f}"])
            del k8, v8, scales
    print(table(rows))
    if a.gemv:
        res["gemv"] = _gemv_bench(bw, dtype, a.gemv_rows)
    if a.fp8:
        res["fp8_gemm"] = _fp8_gemm_bench(a.fp8_rows, mm)
    if a.moe_tokens:
        res["moe"] = _moe_bench(a.moe_tokens, bw, mm)
    if a.int4_rows:
        res["int4"] = _int4_bench(a.int4_rows, bw)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {mm / 1e12:.0f} TFLOP/s, {gpu_name()}")
    return res


def _gemv_bench(bw: float, dtype: torch.dtype, row_counts: list[int]) -> list[dict]:
    """Each decode projection with its prologue, at one row (batch-1 decode) and at a few (a verifying step, a small
    batch): one fused GEMV vs the prologue kernel + torch.matmul (cuBLAS). Weights rotate over copies larger than L2
    together, so every call streams its weight from HBM. Where fused / unfused passes 1 is where the GEMV stops
    paying (what kernels.LAYER_GEMV_ROWS should be set to)."""
    out, rows = [], [["projection (prologue) x rows", "fused us", "fused GB/s", "% of copy bw", "unfused us",
                      "unfused GB/s", "FP8 fused us", "FP8 % of copy bw"]]
    for (name, n, k, pro), m in itertools.product(PROJECTIONS, row_counts):
        copies = max(2, -(-(512 << 20) // (2 * n * k)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(m, 2 * k if pro == "silu_mul" else k, device="cuda", dtype=dtype)
        res, nw = torch.randn(m, k, device="cuda", dtype=dtype), torch.rand(k, device="cuda", dtype=dtype)
        kw = dict(residual=res, norm_weight=nw) if pro == "rmsnorm" else {}
        fused = graph_us([lambda w=w: gemv(x, w, prologue=pro, **kw) for w in ws])
        if pro == "rmsnorm":
            unfused = graph_us([lambda w=w: fused_add_rms_norm(x, res, nw, 1e-6)[0] @ w.T for w in ws])
        elif pro == "silu_mul":
            unfused = graph_us([lambda w=w: silu_and_mul(x) @ w.T for w in ws])
        else:
            unfused = graph_us([lambda w=w: x @ w.T for w in ws])
        nbytes = n * k * ws[0].element_size()
        # FP8 weights (per-channel scales), as a model quantized with --quantization fp8 runs them
        w8 = [(w.to(torch.float8_e4m3fn), torch.rand(n, device="cuda") / 448) for w in ws for _ in range(2)]
        fp8 = graph_us([lambda w=w, sc=sc: gemv(x, w, prologue=pro, weight_scale=sc, **kw) for w, sc in w8])
        r = dict(name=name, n=n, k=k, rows=m, prologue=pro, fused_us=fused, unfused_us=unfused, fused_GBps=nbytes / fused / 1e3,
                 unfused_GBps=nbytes / unfused / 1e3, pct_copy_bw=100 * nbytes / fused / 1e-6 / bw, fp8_us=fp8,
                 fp8_pct_copy_bw=100 * (n * k + 4 * n) / fp8 / 1e-6 / bw)
        out.append(r)
        rows.append([f"{name} {n}x{k} ({pro}) x{m}", f"{fused:.1f}", f"{r['fused_GBps']:.0f}", f"{r['pct_copy_bw']:.0f}",
                     f"{unfused:.1f}", f"{r['unfused_GBps']:.0f}", f"{fp8:.1f}", f"{r['fp8_pct_copy_bw']:.0f}"])
        del ws, x, w8
    print(table(rows))
    return out


def _fp8_gemm_bench(row_counts: list[int], mm: float) -> list[dict]:
    """The 8B model's projections at M rows: our FP8 GEMM (per-token x per-channel scales, and 128-block scales),
    cuBLASLt FP8 through torch._scaled_mm (row-wise scales), and cuBLAS bf16. TFLOP/s of the GEMM alone (the
    activation quantization is timed apart: it is one pass over the activations)."""
    out = []
    rows = [["M x N x K", "ours FP8", "ours FP8 block", "_scaled_mm FP8", "cuBLAS bf16", "ours / bf16",
             "ours / _scaled_mm", "quantize us"]]
    for m in row_counts:
        for name, n, k, _ in PROJECTIONS[:4]:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            a8, sa = quantize_fp8(a)
            w8, sw = w.to(torch.float8_e4m3fn), torch.rand(n, device="cuda") / 448
            ab8, sab = quantize_fp8(a, 128)
            swb = torch.rand(n // 128, k // 128, device="cuda") / 448
            flops = 2 * m * n * k
            ours = _ms(lambda: fp8_gemm(a8, sa, w8, sw, None, torch.bfloat16))
            block = _ms(lambda: fp8_gemm(ab8, sab, w8, swb, None, torch.bfloat16, (128, 128)))
            bf16 = _ms(lambda: a @ w.T)
            quant = _ms(lambda: quantize_fp8(a))
            try:
                cublas = _ms(lambda: torch._scaled_mm(a8, w8.T, scale_a=sa[:, None], scale_b=sw[None, :],
                                                      out_dtype=torch.bfloat16))
            except RuntimeError as e:  # row-wise scales need a recent cuBLASLt
                print(f"torch._scaled_mm: {str(e).splitlines()[0]}")
                cublas = float("nan")
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            r = dict(m=m, n=n, k=k, name=name, ours_tflops=tf(ours), ours_block_tflops=tf(block), scaled_mm_tflops=tf(cublas),
                     bf16_tflops=tf(bf16), quantize_us=quant * 1e3)
            out.append(r)
            rows.append([f"{m} x {n} x {k} ({name})", f"{tf(ours):.0f}", f"{tf(block):.0f}", f"{tf(cublas):.0f}",
                         f"{tf(bf16):.0f}", f"{bf16 / ours:.2f}", f"{cublas / ours:.2f}", f"{quant * 1e3:.1f}"])
            del a, w, a8, w8, ab8
    print(table(rows))
    print(f"TFLOP/s; bf16 matmul rate measured {mm / 1e12:.0f}")
    return out


def _int4_bench(row_counts: list[int], bw: float) -> list[dict]:
    """The 8B model's projections on 4-bit weights (groups of 128) against bf16, at M rows, in CUDA graphs with weights
    rotating through copies larger than L2. int4: the fused GEMV up to LAYER_GEMV_ROWS rows (RMSNorm / SwiGLU
    prologue as the model runs it), the W4A16 GEMM above; dequant + cuBLAS: the whole weight dequantized to bf16
    (kernels/int4.py dequantize) then cuBLAS, what steps past W4A16_GEMM_ROWS rows run; bf16: the fused GEMV up to
    LAYER_GEMV_ROWS rows, cuBLAS above; "layer": whichever of the two 4-bit forms the layer runs at M. Where dequant
    + cuBLAS overtakes the W4A16 GEMM is the crossover W4A16_GEMM_ROWS must hold."""
    out, rows = [], [["M x N x K (name)", "GEMV / W4A16 GEMM us", "dequant + cuBLAS us", "bf16 us", "layer runs",
                      "bf16 / layer", "layer's 4-bit weights % of copy bw"]]
    for m in row_counts:
        for name, n, k, pro in PROJECTIONS[:4]:
            copies = max(2, -(-(512 << 20) // (2 * n * k)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            packed = [quantize_rtn(w, 128) for w in ws]
            width = 2 * k if pro == "silu_mul" and m <= LAYER_GEMV_ROWS else k
            x = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
            res_, nw = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.rand(k, device="cuda", dtype=torch.bfloat16)
            kw = dict(residual=res_, norm_weight=nw) if pro == "rmsnorm" else {}
            if m <= LAYER_GEMV_ROWS:
                ours = graph_us([lambda q=q: gemv(x, q[0], prologue=pro, weight_scale=q[1], weight_offset=q[2], group=128,
                                                   **kw) for q in packed])
                bf16 = graph_us([lambda w=w: gemv(x, w, prologue=pro, **kw) for w in ws])
            else:
                ours = graph_us([lambda q=q: w4a16_gemm(x, *q, 128) for q in packed])
                bf16 = graph_us([lambda w=w: x @ w.T for w in ws])
            deq = graph_us([lambda q=q: x[:, :k] @ dequantize(*q, 128, torch.bfloat16).T for q in packed])
            runs, layer = (("gemv" if m <= LAYER_GEMV_ROWS else "w4a16 gemm", ours) if m <= W4A16_GEMM_ROWS
                           else ("dequant + cuBLAS", deq))
            nbytes = n * k // 2 + 4 * n * (k // 128)
            r = dict(m=m, n=n, k=k, name=name, int4_us=ours, dequant_cublas_us=deq, bf16_us=bf16, layer_runs=runs,
                     layer_us=layer, layer_pct_copy_bw=100 * nbytes / layer / 1e-6 / bw)
            out.append(r)
            rows.append([f"{m} x {n} x {k} ({name})", f"{ours:.1f}", f"{deq:.1f}", f"{bf16:.1f}", runs,
                         f"{bf16 / layer:.2f}", f"{r['layer_pct_copy_bw']:.0f}"])
            del ws, packed, x
    print(table(rows))
    return out


def _grouped_mm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """The same layer out of torch ops: pairs sorted by expert, two torch._grouped_mm calls (cuBLAS grouped GEMM on
    Hopper), SwiGLU and the weighted sum between them."""
    k, e = ids.shape[1], w13.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.nn.functional.one_hot(flat, e).sum(0).cumsum(0).to(torch.int32)
    token = order // k
    gate, up = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs).chunk(2, -1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    return torch.zeros_like(x).index_add_(0, token, y * weights.reshape(-1)[order, None].to(y.dtype))


def _moe_bench(token_counts: list[int], bw: float, mm: float) -> list[dict]:
    """One Qwen3-30B-A3B MoE layer (128 experts, top 8, hidden 2048, expert width 768), bf16, router output fixed
    (uniformly random experts): our fused kernels vs torch._grouped_mm, each replayed in a CUDA graph where it can
    be captured. TFLOP/s over the pairs' FLOPs; weight bytes of the experts hit per unit of time vs the copy rate
    (what bounds the small steps of decode). Then the same layer with FP8 experts in 128 x 128 blocks (as
    Qwen3-30B-A3B-FP8 ships them), W8A16: half the weight bytes; and with 4-bit experts in groups of 128 (W4A16, as
    AWQ / GPTQ checkpoints hold them): a quarter, plus the group scales. "ours" runs the form the layer would run
    (tuned table or heuristic); the grouped GEMMs (heuristic tiles) and the grouped GEMV are timed apart too, the GEMV
    up to 64 tokens, to show where one overtakes the other."""
    model = ModelConfig.from_hf(json.loads(resources.files("slipstream.configs").joinpath("qwen3-30b-a3b.json").read_text()))
    e, k, h, inter = model.moe.num_experts, model.moe.top_k, model.hidden_size, model.moe.intermediate_size
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    fp8 = [[torch.stack(x) for x in zip(*(quantize_weight_blocks(w[i], (128, 128)) for i in range(e)))] for w in (w13, w2)]
    (q13, s13), (q2, s2) = fp8
    quant = Fp8Experts(s13, s2, (128, 128))
    (p13, g13, o13), (p2, g2, o2) = ([torch.stack(x) for x in zip(*(quantize_rtn(w[i], 128) for i in range(e)))]
                                     for w in (w13, w2))
    int4 = Int4Experts(g13, o13, 128, g2, o2, 128)
    smem = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 96 << 10)
    out, rows = [], [["tokens", "ours us", "gemm us", "gemv us", "ours TFLOP/s", "ours % of matmul", "ours weights % of copy bw",
                      "grouped_mm us", "grouped_mm TFLOP/s", "ours / grouped_mm", "fp8 us", "fp8 weights % of copy bw",
                      "bf16 / fp8", "int4 us", "bf16 / int4"]]
    for t in token_counts:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(t, k, device="cuda").softmax(-1)
        ids = torch.rand(t, e, device="cuda").topk(k, -1).indices
        ref = _grouped_mm_moe(x, w13, w2, weights, ids) if hasattr(torch, "_grouped_mm") else None
        ours = fused_moe(x, w13, w2, weights, ids)
        if ref is not None:
            torch.testing.assert_close(ours, ref, atol=3e-2, rtol=3e-2)  # the comparison is of the same layer
        torch.testing.assert_close(fused_moe(x, q13, q2, weights, ids, quant=quant), ours, atol=6e-2, rtol=6e-2)
        torch.testing.assert_close(fused_moe(x, p13, p2, weights, ids, quant=int4), ours, atol=0.2, rtol=0.2)
        us = _timed(lambda: fused_moe(x, w13, w2, weights, ids))
        gemm_us = _timed(lambda: fused_moe(x, w13, w2, weights, ids, tiles=default_tiles(t * k, 2, smem)))
        gemv_us = float("nan")
        if t <= GEMV_TOKENS:
            torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, tiles=dict(GEMV=True)), ours, atol=3e-2, rtol=3e-2)
            gemv_us = _timed(lambda: fused_moe(x, w13, w2, weights, ids, tiles=dict(GEMV=True)))
        theirs = _timed(lambda: _grouped_mm_moe(x, w13, w2, weights, ids)) if ref is not None else float("nan")
        fp8_us = _timed(lambda: fused_moe(x, q13, q2, weights, ids, quant=quant))
        int4_us = _timed(lambda: fused_moe(x, p13, p2, weights, ids, quant=int4))
        flops = 6 * t * k * h * inter
        nbytes = ids.unique().numel() * 3 * h * inter * 2
        r = dict(tokens=t, ours_us=us, gemm_us=gemm_us, gemv_us=gemv_us, ours_tflops=flops / us / 1e6, grouped_mm_us=theirs,
                 grouped_mm_tflops=flops / theirs / 1e6, pct_matmul=100 * flops / us / 1e-6 / mm,
                 weights_pct_copy_bw=100 * nbytes / us / 1e-6 / bw, fp8_us=fp8_us,
                 fp8_weights_pct_copy_bw=100 * nbytes / 2 / fp8_us / 1e-6 / bw, int4_us=int4_us)
        out.append(r)
        rows.append([str(t), f"{us:.1f}", f"{gemm_us:.1f}", f"{gemv_us:.1f}", f"{r['ours_tflops']:.0f}", f"{r['pct_matmul']:.0f}", f"{r['weights_pct_copy_bw']:.0f}",
                     f"{theirs:.1f}", f"{r['grouped_mm_tflops']:.0f}", f"{theirs / us:.2f}", f"{fp8_us:.1f}",
                     f"{r['fp8_weights_pct_copy_bw']:.0f}", f"{us / fp8_us:.2f}", f"{int4_us:.1f}", f"{us / int4_us:.2f}"])
    print(table(rows))
    return out


def _timed(fn) -> float:  # noqa: ANN001
    """µs per call: replayed in a CUDA graph (as the engine runs decode), or timed eagerly where capture fails."""
    try:
        return graph_us([fn])
    except RuntimeError:
        torch.cuda.synchronize()
        return _ms(fn) * 1e3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="attention and decode-projection kernels vs torch SDPA, cuBLAS and copy bandwidth")
    p.add_argument("--prefill-lens", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--decode-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip the decode projection table")
    p.add_argument("--gemv-rows", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="rows of the decode projection table (1: batch-1 decode; more: verifying steps, small batches)")
    p.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the FP8 GEMM table")
    p.add_argument("--fp8-rows", type=int, nargs="*", default=[64, 512, 4096], help="M of the FP8 GEMM table")
    p.add_argument("--moe-tokens", type=int, nargs="*", default=[1, 64, 512, 4096], help="tokens of the MoE layer table")
    p.add_argument("--int4-rows", type=int, nargs="*", default=[1, 16, 64, 256], help="M of the 4-bit vs bf16 table")
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=run)
