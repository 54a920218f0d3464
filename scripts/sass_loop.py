"""What the decode-path kernels' inner loops spend instructions on, with no GPU: each kernel compiled for sm_90 by
Triton's own ptxas (shipped in its wheel), disassembled with its nvdisasm, and the longest loop's instructions counted.
The one-row GEMVs (16-bit, FP8 and 4-bit weights, K whole or in slices), the W4A16 decode GEMM, the MoE grouped GEMV
and the split-KV decode attention on 16-bit and FP8 pools.

    python3 scripts/sass_loop.py      # on any machine with Triton (the CPU one included)

A tile's instructions over the weights (or K/V elements) each thread handles in it is the ALU work one costs; the count
is static (one pass of the loop body), not a profile. The Triton on the machine compiles: its version is printed.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slipstream.kernels.attention import _decode_kernel
from slipstream.kernels.int4 import _w4a16_kernel
from slipstream.kernels.matvec import _gemv_int4_kernel, _gemv_kernel
from slipstream.kernels.moe import _moe_gemv_kernel

# sizes and strides the JIT sees as multiples of 16 at the engine's shapes
DIV16 = ("N", "K", "group", "stride_q", "stride_s", "stride_xm", "stride_qn", "stride_sn", "stride_ym", "stride_w",
         "stride_ws", "stride_x", "stride_y", "stride_we", "stride_wse", "stride_kp", "stride_kt", "stride_kh",
         "stride_sp", "stride_qb", "stride_qh", "stride_bt", "stride_ob", "stride_oh", "stride_pb", "stride_ph",
         "stride_lb", "stride_lh")


def compiled_sass(fn, types: dict, consts: dict, warps: int, stages: int) -> str:
    """`fn` compiled for sm_90 with pointers and the named sizes taken as multiples of 16 (as the JIT specializes
    them at the engine's shapes), as SASS text."""
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith("*") or n in DIV16)}
    k = triton.compile(ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()},
                                 attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loop_counts(sass: str) -> collections.Counter:
    """The instructions of the longest backward branch's body, by opcode (with modifiers)."""
    lines = sass.splitlines()
    labels = {ln.split(":")[0]: i for i, ln in enumerate(lines) if re.match(r"\.L_x_\d+:", ln)}
    best = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    ops = collections.Counter()
    for ln in lines[best[0]:best[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops


def main() -> None:
    print(f"triton {triton.__version__}, sm_90")
    io = dict(x_ptr="*bf16", res_ptr="*bf16", nw_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", res_out_ptr="*bf16",
              q_ptr="*u8", s_ptr="*fp16", o_ptr="*fp16", bias_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32", eps="fp32",
              w_ptr="*bf16", ws_ptr="*fp32", wo_ptr="*fp32", ids_ptr="*i32", rw_ptr="*fp32")
    pro = {0: "no prologue", 1: "RMSNorm prologue"}
    # (name, kernel, argument types, constexprs, warps, stages, weights (or K/V elements) a thread handles a pass)
    cases = [(f"one-row GEMV on 4-bit weights, {bn} rows x {bk} columns, {warps} warp(s), {form}, {pro[p]}"
              + (f", K in {split} slices" if split > 1 else ""), _gemv_int4_kernel, io,
              dict(GROUP=128, PROLOGUE=p, HAS_RES=p == 1, HAS_BIAS=False, SPAN=128, HALF2=half2, BLOCK_N=bn,
                   SPLIT_K=split, BLOCK_K=bk, PDL=False), warps, 3, bn * bk // (32 * warps))
             for half2, form in ((False, "float32 sums"), (True, "half-precision pairs"))
             for bn, bk, warps in ((16, 512, 4), (16, 256, 1))
             for split in ((1, 2) if half2 and warps == 1 else (1,))
             for p in (0, 1)]
    cases += [(f"one-row GEMV on {name} weights, {bn} rows x {bk} columns, {warps} warps, {pro[p]}", _gemv_kernel,
               dict(io, w_ptr=w), dict(PROLOGUE=p, HAS_RES=p == 1, HAS_BIAS=False, SCALE=scale, SCALE_BN=1, SCALE_BK=1,
                                       PRECISION="tf32", NORM_ON_W=False, BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
                                       PDL=True), warps, stages, bn * bk // (32 * warps))
              for name, w, scale, bn, bk, warps, stages in (("bf16", "*bf16", 0, 8, 512, 4, 3),
                                                            ("FP8", "*fp8e4nv", 1, 16, 1024, 8, 3))
              for p in (0, 1)]
    cases.append(("W4A16 GEMM, decode tiles 64 (transposed) x 16 x 128, 4 slices", _w4a16_kernel, io,
                  dict(HAS_BIAS=False, PRECISION="tf32", CODE=0, OFFSET=True, FINE=False, BLOCK_M=16, BLOCK_N=64,
                       BLOCK_K=128, SPLIT_K=4, SWAP=True, SUMS=True, PDL=True), 4, 4, 64 * 128 // 128))
    cases += [(f"MoE grouped GEMV on bf16 experts, {'down (SwiGLU, routing weight)' if down else 'gate-up (RMSNorm)'}, "
               "8 rows x 512 columns, 4 warps", _moe_gemv_kernel, io,
               dict(DOWN=down, NORM=not down, NORM_ON_W=False, SCALE=0, SCALE_BN=1, SCALE_BK=1, BLOCK_N=8, BLOCK_K=512,
                    SPLIT_K=1, PDL=True), 4, 3, 8 * 512 // 128) for down in (False, True)]
    # decode attention as `bench kernels` times it (4 query heads a KV head, head dim 128, 64-token pages): K and V
    # elements a thread a tile
    for pool, kv in (("bf16", "*bf16"), ("FP8", "*fp8e4nv")):
        types = dict(q_ptr="*bf16", k_cache=kv, v_cache=kv, k_scales="*fp32", v_scales="*fp32", block_tables="*i32",
                     seq_lens="*i32", out_ptr="*bf16", part_out="*fp32", part_lse="*fp32", shared_ptr="*i32",
                     scale_log2="fp32")
        cases += [(f"split-KV decode on a {pool} pool, {tile}-token tiles", _decode_kernel, types,
                   dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=64, BLOCK_N=tile, SPLIT=tile == 64, SHARED=False,
                        PRECISION="tf32", SCALED=pool == "FP8", PART_MIN=128, PDL=True), 4, stages, tile * 128 * 2 // 128)
                  for tile, stages in ((64, 3), (128, 2))]
    for name, fn, types, consts, warps, stages, per_thread in cases:
        ops = loop_counts(compiled_sass(fn, types, consts, warps, stages))
        total = sum(ops.values())
        print(f"\n{name}: {total} instructions a pass for {per_thread} a thread, {total / per_thread:.2f} each")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
