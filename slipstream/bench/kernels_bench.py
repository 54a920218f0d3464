"""Attention kernels against their limits in one run: prefill TFLOP/s vs torch SDPA (causal, 2K/8K/32K) and
decode GB/s vs the measured copy bandwidth (batch 1/16/64 x 1K/4K/16K), Llama-3.1-8B head shape."""
from __future__ import annotations

import argparse

import torch
import triton

from slipstream.bench.common import copy_bandwidth, gpu_name, matmul_rate, table
from slipstream.kernels.attention import decode_partition, paged_decode, paged_prefill

HQ, HK, D, PAGE = 32, 8, 128, 16


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
    rows = [["decode", "slipstream GB/s", "% of copy bandwidth", "us"]]
    for batch in a.decode_batches:
        for ctx in a.decode_lens:
            k, v, tables = _paged(ctx, batch, dtype)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=dtype)
            seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            part = decode_partition(batch, HK, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
            ms = _ms(lambda: paged_decode(q, k, v, tables, seq_lens, ctx, part, D**-0.5))
            nbytes = 2 * batch * ctx * HK * D * k.element_size() + 2 * q.numel() * q.element_size()
            r = dict(batch=batch, ctx=ctx, us=ms * 1e3, GBps=nbytes / ms / 1e6, pct_copy_bw=100 * nbytes / ms / 1e-3 / bw)
            res["decode"].append(r)
            rows.append([f"B={batch} x {ctx // 1024}K", f"{r['GBps']:.0f}", f"{r['pct_copy_bw']:.0f}", f"{r['us']:.1f}"])
            del k, v
    print(table(rows))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {mm / 1e12:.0f} TFLOP/s, {gpu_name()}")
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="attention kernels vs torch SDPA and copy bandwidth")
    p.add_argument("--prefill-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--decode-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=run)
