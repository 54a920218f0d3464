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
def _split_dot_kernel(x_ptr, q_ptr, s_ptr, o_ptr, y_ptr, M, N, K, group, stride_q, stride_s,
                      PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x @ W^T, W = q * scale + offset per group, BLOCK_K dividing the group:
        x @ W^T = scale * (x_even @ lo^T + x_odd @ hi^T) + offset * sum(x)  per K step,
    lo / hi the nibbles (columns 2j / 2j + 1) made 16-bit by bit pattern, q + bias (bias * sum(x) taken off)."""
    await_inputs(PDL)
    HALF: tl.constexpr = BLOCK_K // 2
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m, ok_n = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=ok_m[:, None],
                    other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, HALF, 2]))
        packed = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_q + (k0 // 2 + tl.arange(0, HALF))[None, :],
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
        part = tl.dot(x_even, tl.trans(lo), input_precision="ieee" if x.dtype == tl.float32 else "tf32")
        part = tl.dot(x_odd, tl.trans(hi), part, input_precision="ieee" if x.dtype == tl.float32 else "tf32")
        x_sum = tl.sum(x.to(tl.float32), 1)[:, None]
        g = rn * stride_s + k0 // group
        acc += (part - bias * x_sum) * tl.load(s_ptr + g, mask=ok_n, other=0.0).to(tl.float32)[None, :]
        acc += x_sum * tl.load(o_ptr + g, mask=ok_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ok_m[:, None] & ok_n[None, :])


def split_dot(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor, tiles: tuple[int, int, int, int]
              ) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    bm, bn, warps, stages = tiles
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _split_dot_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](x, q, s, o, y, m, n, k, GROUP, q.stride(0), s.stride(0),
                                                                PDL=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=GROUP,
                                                                num_warps=warps, num_stages=stages)
    return y


SPLIT_TILES = [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3)]


def check() -> None:
    """The probe's kernels against torch (fp32 and fp16; bf16 where a GPU runs it)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, k = 96, 512
    q, s, o = quantize_rtn(torch.randn(n, k, generator=g) / k**0.5, GROUP)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if dev == "cuda" else [])
    for dtype in dtypes:
        for m in (1, 5, 20):
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = x.double() @ dequantize(q, s, o, torch.float64).T
            for tiles in SPLIT_TILES[:2]:
                got = split_dot(x.to(dev), q.to(dev), s.to(dev), o.to(dev), tiles).double().cpu()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], (dtype, m, err)
    y = torch.empty(n, dtype=torch.int32, device=dev)
    _stream_kernel[(triton.cdiv(n, 16),)](q.to(dev), y, n, k // 2, PDL=False, BLOCK_N=16, BLOCK_B=64)
    assert torch.equal(y.cpu(), q.to(torch.int32).sum(1).to(torch.int32))
    print("int4_probe: the split-dot GEMM and the stream kernel match torch")


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
        for m in (4, 16, 64):
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row(m, "engine W4A16 GEMM", graph_us([lambda p=p: w4a16_gemm(xm, *p, GROUP) for p in packed]))
            for tiles in SPLIT_TILES:
                if tiles[0] >= m or tiles == SPLIT_TILES[-1]:
                    row(m, f"split-dot GEMM {tiles}", graph_us([lambda p=p: split_dot(xm, *p, tiles) for p in packed]))
            row(m, "bf16 cuBLAS", graph_us([lambda w=w: xm @ w.T for w in ws]))
        del ws, packed
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the probe's kernels against torch and stop")
    if parser.parse_args().check:
        check()
    else:
        main()
