"""Where the 4-bit kernels' time goes on one GPU, and whether another W4A16 GEMM form pays: the evidence for the next
change to kernels/matvec.py's grouped GEMV and kernels/int4.py's GEMM (docs/benchmarks.md, "4-bit weights on the GPU").

    python3 scripts/int4_probe.py            # on a GPU: one table, µs per call, the Llama-3.1-8B shape's projections
    python3 scripts/int4_probe.py --check    # the probe's own kernels against torch (CPU: under TRITON_INTERPRET=1)

One row (batch-1 decode), each projection on 4-bit weights (groups of 128, round-to-nearest):
  - engine: kernels.matvec.gemv as the layers call it (norm or SwiGLU fused), and the same with no prologue: what
    building f(x) in every program costs;
  - stream: a kernel that only loads the packed bytes and sums them, in tiles of the same sizes: the ceiling of streaming
    the weight with those loads (if the engine's GEMV is far below it, its arithmetic is the limit);
  - bf16: the 16-bit fused GEMV on the same shape.
Several rows (decode batches of 4 to 64): the engine's W4A16 GEMM (a scale and an offset applied to every weight,
nibbles interleaved through a reshape), this probe's split-dot GEMM (x loaded whole and split into its even and
odd columns in registers, the integers meeting the tensor cores as bit patterns, q + bias, each group's scale and
offset applied to the dot's sums), and cuBLAS on bf16 weights. Weights rotate through copies larger than L2, every
call replayed from a CUDA graph (bench.common.graph_us).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from slipstream.bench.common import copy_bandwidth, graph_us, table
from slipstream.kernels._pdl import await_inputs
from slipstream.kernels.int4 import w4a16_gemm
from slipstream.kernels.matvec import gemv
from slipstream.layers.quantization.int4 import dequantize, quantize_rtn

GROUP = 128
# the 8B model's projections: (name, N, K, prologue)
SHAPES = [("qkv", 6144, 4096, "rmsnorm"), ("o_proj", 4096, 4096, "none"), ("gate_up", 28672, 4096, "rmsnorm"),
          ("down", 4096, 14336, "silu_mul")]


@triton.jit
def _stream_kernel(q_ptr, y_ptr, N, KB, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """y[n] = the sum of row n's bytes: the packed weight streamed as the grouped GEMV loads it, nothing computed."""
    await_inputs(PDL)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.int32)
    for b0 in range(0, KB, BLOCK_B):
        acc += tl.load(q_ptr + ns.to(tl.int64)[:, None] * KB + (b0 + tl.arange(0, BLOCK_B))[None, :],
                       mask=(ns < N)[:, None], other=0).to(tl.int32)
    tl.store(y_ptr + ns, tl.sum(acc, 1), mask=ns < N)


_stream = triton.autotune([triton.Config({"BLOCK_N": bn, "BLOCK_B": bb}, num_warps=w, num_stages=s)
                           for bn, bb, w, s in [(8, 256, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 8, 3),
                                                (64, 128, 8, 3), (16, 512, 8, 3)]],
                          key=["N", "KB"])(_stream_kernel)


@triton.jit
def _split_dot_kernel(x_ptr, q_ptr, s_ptr, o_ptr, y_ptr, M, N, K, stride_q, stride_s, PDL: tl.constexpr,
                      SWAP: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x @ W^T, W = q * scale + offset per GROUP columns, BLOCK_K a multiple of GROUP:
        x @ W^T = scale * (x_even @ lo^T + x_odd @ hi^T) + offset * sum(x)  per group,
    lo / hi the nibbles (columns 2j / 2j + 1) made 16-bit by bit pattern, q + bias (bias * sum(x) taken off).
    SWAP: the weight is the dot's left operand (W @ x^T: its rows fill the tensor cores' M, so one row of x pads only
    the narrow side). SPLIT programs share a row's K range and add their sums into y (float32, zeroed first)."""
    await_inputs(PDL)
    HALF: tl.constexpr = GROUP // 2
    precision: tl.constexpr = "ieee" if x_ptr.dtype.element_ty == tl.float32 else "tf32"
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m, ok_n = rm < M, rn < N
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    per_split = K // SPLIT
    k_begin = tl.program_id(2) * per_split
    for k0 in range(k_begin, k_begin + per_split, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // GROUP):
            kg = k0 + sub * GROUP
            x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + (kg + tl.arange(0, GROUP))[None, :],
                        mask=ok_m[:, None], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, HALF, 2]))
            packed = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_q + (kg // 2 + tl.arange(0, HALF))[None, :],
                             mask=ok_n[:, None], other=0).to(tl.int16)
            lo, hi = packed & 15, packed >> 4
            if x.dtype.is_bf16():
                bias = 128.0
                lo, hi = (lo | 0x4300).to(tl.bfloat16, bitcast=True), (hi | 0x4300).to(tl.bfloat16, bitcast=True)
            elif x.dtype.is_fp16():
                bias = 1024.0
                lo, hi = (lo | 0x6400).to(tl.float16, bitcast=True), (hi | 0x6400).to(tl.float16, bitcast=True)
            else:
                bias = 0.0
                lo, hi = lo.to(tl.float32), hi.to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), 1)
            g = rn * stride_s + kg // GROUP
            scale = tl.load(s_ptr + g, mask=ok_n, other=0.0).to(tl.float32)
            offset = tl.load(o_ptr + g, mask=ok_n, other=0.0).to(tl.float32)
            if SWAP:
                part = tl.dot(lo, tl.trans(x_even), input_precision=precision)
                part = tl.dot(hi, tl.trans(x_odd), part, input_precision=precision)
                acc += (part - bias * x_sum[None, :]) * scale[:, None] + offset[:, None] * x_sum[None, :]
            else:
                part = tl.dot(x_even, tl.trans(lo), input_precision=precision)
                part = tl.dot(x_odd, tl.trans(hi), part, input_precision=precision)
                acc += (part - bias * x_sum[:, None]) * scale[None, :] + x_sum[:, None] * offset[None, :]
    if SWAP:
        at, ok = rm[None, :].to(tl.int64) * N + rn[:, None], ok_m[None, :] & ok_n[:, None]
    else:
        at, ok = rm[:, None].to(tl.int64) * N + rn[None, :], ok_m[:, None] & ok_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptr + at, acc, mask=ok, sem="relaxed")


def split_dot(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor, tiles: tuple) -> torch.Tensor:
    """tiles: (swap, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split)."""
    m, k = x.shape
    n = q.shape[0]
    swap, bm, bn, bk, warps, stages, split = tiles
    if split == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    _split_dot_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
        x, q, s, o, y, m, n, k, q.stride(0), s.stride(0), PDL=False, SWAP=swap, SPLIT=split, GROUP=GROUP,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


# (swap, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split); K of every shape is a multiple of BLOCK_K * split
SPLIT_TILES = [(False, 16, 32, 128, 4, 4, 1), (False, 16, 64, 128, 4, 4, 1), (False, 16, 128, 128, 4, 3, 1),
               (True, 16, 16, 256, 1, 4, 1), (True, 16, 32, 256, 2, 4, 1), (True, 16, 32, 512, 4, 3, 1),
               (True, 16, 64, 256, 4, 4, 1), (True, 16, 64, 512, 4, 3, 1), (True, 16, 128, 256, 4, 3, 1),
               (True, 16, 64, 256, 4, 4, 2), (True, 16, 32, 256, 2, 4, 4), (True, 16, 64, 512, 4, 3, 4),
               (True, 32, 64, 256, 4, 4, 1), (True, 64, 64, 256, 4, 3, 1),
               (False, 64, 64, 128, 4, 4, 1), (False, 64, 128, 128, 8, 3, 1)]


@triton.jit
def _fp8_dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = (x @ W^T) * scale[n] for FP8 weights with a scale per row, the weight as the dot's left operand (W @ x^T):
    x 16-bit (each weight converted to x's type in registers, W8A16) or FP8 already (W8A8: both into the tensor
    cores as they are; x's own scale left to the caller)."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m, ok_n = rm < M, rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    per_split = K // SPLIT
    k_begin = tl.program_id(2) * per_split
    for k0 in range(k_begin, k_begin + per_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + ks[None, :], mask=ok_m[:, None], other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + ks[None, :], mask=ok_n[:, None], other=0.0)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
    acc *= tl.load(s_ptr + rn, mask=ok_n, other=0.0)[:, None]
    at, ok = rm[None, :].to(tl.int64) * N + rn[:, None], ok_m[None, :] & ok_n[:, None]
    if SPLIT == 1:
        tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptr + at, acc, mask=ok, sem="relaxed")


def fp8_dot(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, tiles: tuple) -> torch.Tensor:
    """tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split)."""
    (m, k), n = x.shape, w.shape[0]
    bm, bn, bk, warps, stages, split = tiles
    out = torch.bfloat16 if x.dtype == torch.float8_e4m3fn else x.dtype
    y = torch.empty(m, n, dtype=out, device=x.device) if split == 1 else torch.zeros(m, n, device=x.device)
    _fp8_dot_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](x, w, s, y, m, n, k, SPLIT=split, BLOCK_M=bm,
                                                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                                                     num_stages=stages)
    return y


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split)
FP8_TILES = [(16, 16, 512, 1, 4, 1), (16, 32, 512, 2, 4, 1), (16, 64, 256, 4, 4, 1), (16, 64, 512, 4, 3, 1),
             (16, 128, 256, 4, 3, 1), (16, 64, 256, 4, 4, 2), (16, 32, 256, 2, 4, 4)]


def check() -> None:
    """The probe's kernels against torch (fp32 and fp16; bf16 where a GPU runs it)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, k = 96, 1024
    q, s, o = quantize_rtn(torch.randn(n, k, generator=g) / k**0.5, GROUP)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if dev == "cuda" else [])
    for dtype in dtypes:
        for m in (1, 5, 20):
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = x.double() @ dequantize(q, s, o, torch.float64).T
            for tiles in [SPLIT_TILES[0], SPLIT_TILES[4], SPLIT_TILES[10]]:
                got = split_dot(x.to(dev), q.to(dev), s.to(dev), o.to(dev), tiles).double().cpu()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (dtype, m, err)
    w8 = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
    ws = torch.rand(n, generator=g)
    for dtype in dtypes[1:]:
        x = torch.randn(3, k, generator=g).to(dtype)
        ref = (x.double() @ w8.double().T) * ws.double()
        for tiles in [FP8_TILES[1], FP8_TILES[-1]]:
            got = fp8_dot(x.to(dev), w8.to(dev), ws.to(dev), tiles).double().cpu()
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 3e-3, (dtype, tiles)
    y = torch.empty(n, dtype=torch.int32, device=dev)
    _stream_kernel[(triton.cdiv(n, 16),)](q.to(dev), y, n, k // 2, PDL=False, BLOCK_N=16, BLOCK_B=64)
    assert torch.equal(y.cpu(), q.to(torch.int32).sum(1).to(torch.int32))
    print("int4_probe: the split-dot GEMM, the FP8 dot and the stream kernel match torch")


def main() -> None:
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    rows = [["projection", "rows", "what", "us", "% of copy bw (4-bit bytes)"]]
    for name, n, k, pro in SHAPES:
        copies = max(2, -(-(512 << 20) // (2 * n * k)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        packed = [quantize_rtn(w, GROUP) for w in ws]
        nbytes = n * k // 2 + 4 * n * (k // GROUP)

        def row(m: int, what: str, us: float) -> None:
            rows.append([f"{name} {n}x{k}", str(m), what, f"{us:.1f}", f"{100 * nbytes / us / 1e-6 / bw:.0f}"])

        width = 2 * k if pro == "silu_mul" else k
        x, res = (torch.randn(1, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16)
        kw = dict(residual=res[:, :k], norm_weight=nw) if pro == "rmsnorm" else {}
        def grouped(p: tuple, xs: torch.Tensor, prologue: str, **extra) -> None:  # noqa: ANN003
            gemv(xs, p[0], prologue=prologue, weight_scale=p[1], weight_offset=p[2], group=GROUP, **extra)
        row(1, f"engine GEMV ({pro})", graph_us([lambda p=p: grouped(p, x, pro, **kw) for p in packed]))
        row(1, "engine GEMV (no prologue)", graph_us([lambda p=p: grouped(p, x[:, :k], "none") for p in packed]))
        sums = torch.empty(n, dtype=torch.int32, device="cuda")
        row(1, "stream the bytes only", graph_us([lambda p=p: _stream[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            p[0], sums, n, k // 2, PDL=False) for p in packed]))
        row(1, f"bf16 fused GEMV ({pro})", graph_us([lambda w=w: gemv(x, w, prologue=pro, **kw) for w in ws]))
        row(1, "zero a float32 output (split-K's extra)", graph_us([lambda: torch.zeros(1, n, device="cuda")]))
        for m in (1, 4, 16, 64):
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if m > 1:
                row(m, "engine W4A16 GEMM", graph_us([lambda p=p: w4a16_gemm(xm, *p, GROUP) for p in packed]))
            for tiles in SPLIT_TILES:
                fits = tiles[1] >= m and (tiles[1] == 16 or m > 16) and (k // tiles[6]) % tiles[3] == 0
                if fits or (m == 64 and tiles[1] == 64):
                    row(m, f"split-dot {tiles}", graph_us([lambda p=p: split_dot(xm, *p, tiles) for p in packed]))
            row(m, "bf16 cuBLAS", graph_us([lambda w=w: xm @ w.T for w in ws]))
        # FP8 weights, one row: the engine's fused GEMV against the weight in the tensor cores (W8A16, and W8A8 with
        # x already FP8); % of copy bw here counts the FP8 bytes
        w8 = [(w.to(torch.float8_e4m3fn), torch.rand(n, device="cuda") / 448) for w in ws]
        nbytes = n * k + 4 * n
        row(1, f"FP8 engine GEMV ({pro})", graph_us([lambda w=w, sc=sc: gemv(x, w, prologue=pro, weight_scale=sc, **kw)
                                                    for w, sc in w8]))
        row(1, "FP8 engine GEMV (no prologue)", graph_us([lambda w=w, sc=sc: gemv(x[:, :k], w, weight_scale=sc)
                                                         for w, sc in w8]))
        x8 = x[:, :k].to(torch.float8_e4m3fn)
        for tiles in FP8_TILES:
            if (k // tiles[5]) % tiles[2] == 0:
                row(1, f"FP8 W8A16 dot {tiles}", graph_us([lambda w=w, sc=sc: fp8_dot(x[:, :k], w, sc, tiles)
                                                           for w, sc in w8]))
                row(1, f"FP8 W8A8 dot {tiles}", graph_us([lambda w=w, sc=sc: fp8_dot(x8, w, sc, tiles) for w, sc in w8]))
        del ws, packed
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the probe's kernels against torch and stop")
    if parser.parse_args().check:
        check()
    else:
        main()
