"""What a kernel launch costs inside a CUDA graph, with and without programmatic dependent launch (PDL, sm90+), and
how fast the batch-1 MoE GEMVs stream their weights: the evidence for where a Qwen3-30B-A3B decode step loses time.

    python3 scripts/pdl_probe.py        # on a GPU; prints one line per measurement

Chains of kernels are captured in a graph and replayed: the time per kernel of a chain of empty kernels (each reading
what the one before wrote) is the fixed cost of a launch; a chain of GEMVs of a decode layer's shapes shows what that
cost does to their bandwidth. Then the two grouped GEMVs of one Qwen3-30B-A3B MoE layer (128 experts of width 768 on
2,048, top 8, one token), each timed alone; last, the layer's dense projections as the engine runs them (norm folded
in) and as cuBLAS does. Every GEMV of a chain reads weights of its own (each layer its own matrices, each launch of an
expert GEMV 8 other experts of the 128), so the bytes come from HBM, not from an L2 (50 MB on an H100) that a chain
repeating one 25 MB projection would serve.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from slipstream.bench.common import copy_bandwidth, graph_us
from slipstream.kernels._pdl import await_inputs


@triton.jit
def _touch(x_ptr, y_ptr, PDL: tl.constexpr):
    await_inputs(PDL)
    tl.store(y_ptr + tl.arange(0, 128), tl.load(x_ptr + tl.arange(0, 128)) + 1)


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    await_inputs(PDL)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=(ns < N)[:, None], other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + ks).to(tl.float32)[None, :]
    tl.store(y_ptr + ns, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=ns < N)


def graph_time(fn) -> float:
    """Seconds of one call of fn, replayed from a CUDA graph (bench.common.graph_us)."""
    return graph_us([fn]) / 1e6


def main() -> None:
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
          f"copy {bw / 1e12:.2f} TB/s")
    chain = 96
    for pdl in (False, True):
        bufs = [torch.zeros(128, device="cuda") for _ in range(chain + 1)]

        def touches() -> None:
            for i in range(chain):
                _touch[(1,)](bufs[i], bufs[i + 1], PDL=pdl, launch_pdl=pdl)
        print(f"empty kernel, pdl={pdl}: {graph_time(touches) / chain * 1e6:.2f} us a kernel")
    # (layer shapes of Qwen3-30B-A3B: q|k|v 5,120 x 2,048; o 2,048 x 4,096; router 128 x 2,048)
    shapes = [(5120, 2048), (2048, 4096), (128, 2048)]
    layers_n = chain // len(shapes)
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in shapes] for _ in range(layers_n)]
    xs = [torch.randn(k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
    ys = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n, _ in shapes]
    for bn, bk, warps in ((8, 512, 4), (16, 256, 4), (4, 1024, 8)):
        for pdl in (False, True):
            def layers() -> None:
                for layer in ws:
                    for w, xx, y in zip(layer, xs, ys):
                        _gemv[(triton.cdiv(w.shape[0], bn),)](xx, w, y, w.shape[0], w.shape[1], PDL=pdl, BLOCK_N=bn,
                                                              BLOCK_K=bk, num_warps=warps, launch_pdl=pdl)
            t = graph_time(layers) / layers_n
            nbytes = sum(w.numel() * 2 for w in ws[0])
            print(f"GEMV chain q|k|v, o, router (BLOCK_N {bn}, BLOCK_K {bk}, {warps} warps), pdl={pdl}: "
                  f"{t * 1e6:.1f} us a layer, {nbytes / t / 1e12:.2f} TB/s = {nbytes / t / bw:.0%} of copy")

    from slipstream.kernels import moe
    from slipstream.kernels.matvec import slice_workspace
    e, inter, h, k = 128, 768, 2048, 8
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    launches = e // k  # each launch 8 experts no other launch reads: all 128 (403 MB), once a replay
    order = torch.randperm(e, device="cuda").to(torch.int32)
    id_sets = [order[i * k:(i + 1) * k][None].contiguous() for i in range(launches)]
    ids = id_sets[0]
    wts = torch.full((1, k), 1 / k, device="cuda")
    mid = torch.randn(k, 2 * inter, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, h, device="cuda", dtype=torch.bfloat16)
    moe.grouped_gemv(x, w13, w2, wts, ids)  # autotunes both projections
    for name, a, b, c, n, kk, rows, per_row, x_div, down in (
            ("gate-up", x, w13, mid, 2 * inter, h, k, 1, k, False), ("down", mid, w2, out, h, inter, 1, k, 1, True)):
        for pdl in (False, True):
            def run() -> None:
                for chosen in id_sets:  # (each launch waits for the one before)
                    moe._moe_gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), rows, meta["SPLIT_K"])](
                        a, b, x, x, chosen, wts, a, c, *slice_workspace(n, a.device, rows), n, kk, e, per_row, x_div,
                        0.0, 1, a.stride(0), c.stride(0),
                        b.stride(0), b.stride(1), 0, 0, DOWN=down, NORM=False, NORM_ON_W=False, SCALE=0, SCALE_BN=1,
                        SCALE_BK=1, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
            t = graph_time(run) / launches
            nbytes = k * n * kk * 2
            best = [cfg.all_kwargs() for key, cfg in moe._moe_gemv.cache.items() if key[0] == n and key[1] == kk]
            print(f"MoE {name} GEMV, 1 token, pdl={pdl}: {t * 1e6:.1f} us, {nbytes / t / 1e12:.2f} TB/s = "
                  f"{nbytes / t / bw:.0%} of copy; tiles {best}")
    engine_gemvs(ws, bw)


def engine_gemvs(ws: list[list[torch.Tensor]], bw: float) -> None:
    """The same layers' projections as the engine's batch-1 step runs them (kernels.matvec.gemv: q|k|v and the router
    with the residual add and RMSNorm folded in, o plain), beside cuBLAS's unfused GEMVs (torch.nn.functional.linear)."""
    from slipstream.kernels import matvec

    h = ws[0][0].shape[1]
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    attn = torch.randn(1, ws[0][1].shape[1], device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(h, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(w.numel() * 2 for w in ws[0])

    def fused() -> None:
        for qkv, o, router in ws:
            matvec.gemv(x, qkv, prologue="rmsnorm", residual=res, norm_weight=nw)
            matvec.gemv(attn, o)
            matvec.gemv(x, router, prologue="rmsnorm", residual=res, norm_weight=nw)

    def cublas() -> None:
        for qkv, o, router in ws:
            torch.nn.functional.linear(x, qkv)
            torch.nn.functional.linear(attn, o)
            torch.nn.functional.linear(x, router)

    with_pdl = matvec.pdl
    for name, fn in (("fused, pdl=True", fused), ("fused, pdl=False", fused), ("cuBLAS, unfused", cublas)):
        matvec.pdl = with_pdl if name.endswith("True") else (lambda t: {"PDL": False})
        t = graph_time(fn) / len(ws)
        print(f"engine GEMVs q|k|v (norm), o, router (norm), {name}: {t * 1e6:.1f} us a layer, "
              f"{nbytes / t / 1e12:.2f} TB/s = {nbytes / t / bw:.0%} of copy")
    matvec.pdl = with_pdl


if __name__ == "__main__":
    main()
