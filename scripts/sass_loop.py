"""What the 4-bit kernels' inner loops spend instructions on, with no GPU: each kernel compiled for sm_90 by Triton's
own ptxas (shipped in its wheel), disassembled with its nvdisasm, and the longest loop's instructions counted.

    python3 scripts/sass_loop.py      # on any machine with Triton (the CPU one included)

A tile's instructions over the weights each thread handles in it is the ALU work a weight costs; the count is
static (one pass of the loop body), not a profile. The Triton on the machine compiles: its version is printed.
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

from slipstream.kernels.int4 import _w4a16_kernel
from slipstream.kernels.matvec import _gemv_int4_kernel

DIV16 = ("N", "K", "group", "stride_q", "stride_s", "stride_xm", "stride_qn", "stride_sn", "stride_ym")


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
              q_ptr="*u8", s_ptr="*fp16", o_ptr="*fp16", bias_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32", eps="fp32")
    # (name, kernel, constexprs, warps, stages, weights a thread handles in one pass of the loop)
    cases = [(f"one-row GEMV, {bn} rows x {bk} columns, {warps} warp(s), {form}, {pro}", _gemv_int4_kernel,
               dict(GROUP=128, PROLOGUE=p, HAS_RES=p == 1, HAS_BIAS=False, SPAN=128, HALF2=half2, BLOCK_N=bn, SPLIT_K=1,
                    BLOCK_K=bk, PDL=False), warps, 3, bn * bk // (32 * warps))
             for half2, form in ((False, "float32 sums"), (True, "half-precision pairs"))
             for bn, bk, warps in ((16, 512, 4), (16, 256, 1))
             for p, pro in ((0, "no prologue"), (1, "RMSNorm prologue"))]
    cases.append(("W4A16 GEMM, decode tiles 64 (transposed) x 16 x 128, 4 slices", _w4a16_kernel,
                  dict(HAS_BIAS=False, PRECISION="tf32", CODE=0, OFFSET=True, FINE=False, BLOCK_M=16, BLOCK_N=64,
                       BLOCK_K=128, SPLIT_K=4, SWAP=True, SUMS=True, PDL=True), 4, 4, 64 * 128 // 128))
    for name, fn, consts, warps, stages, per_thread in cases:
        ops = loop_counts(compiled_sass(fn, io, consts, warps, stages))
        total = sum(ops.values())
        print(f"\n{name}: {total} instructions a pass for {per_thread} weights a thread, "
              f"{total / per_thread:.2f} a weight")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
