"""Same lease, same process: the one-row GEMV of other versions of kernels/matvec.py (module files given on the command
line, e.g. main's, copied into an ignored folder before the call) against this tree's, on the Llama-3.1-8B projections
with 16-bit, FP8 (a scale per row) and 4-bit weights (groups of 128), each with the prologue the engine fuses into it.
Each GEMV is replayed in a CUDA graph, one call after another on weights that rotate past L2, as a decode step runs
them back to back (PDL included, where the version has it).

    git show main:slipstream/kernels/matvec.py > .ab/matvec_main.py      (here, then carry .ab)
    python3 scripts/gemv_ab.py .ab/matvec_main.py [.ab/matvec_other.py ...]

Under Nsight Compute, this tree's GEMV once per projection, cold (after the timing, so the autotuner's launches are
not profiled):
    FORMS="fp8 int4" ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats python3 scripts/gemv_ab.py
"""
import os
import sys

import torch
import triton

from slipstream.bench.common import copy_bandwidth, graph_us, module_from_file, table
from slipstream.kernels import matvec
from slipstream.layers.quantization.fp8 import quantize_weight_per_channel
from slipstream.layers.quantization.int4 import quantize_rtn

SHAPES = [("qkv", 6144, 4096, "rmsnorm"), ("o_proj", 4096, 4096, "none"), ("gate_up", 28672, 4096, "rmsnorm"),
          ("down", 4096, 14336, "silu_mul")]


versions = [(os.path.basename(p), module_from_file(p)) for p in sys.argv[1:]] + [("this tree", matvec)]
bw = copy_bandwidth(torch.device("cuda"))
print(torch.cuda.get_device_name(), "triton", triton.__version__, f"copy {bw / 1e12:.2f} TB/s")
rows = [["weights", "projection (prologue)", "MB"] + [f"{name} us (% copy)" for name, _ in versions] + ["max rel. diff"]]
for form in os.environ.get("FORMS", "bf16 fp8 int4").split():
    for name, n, k, pro in SHAPES:
        nbytes = (n * k * {"bf16": 2, "fp8": 1, "int4": 0.5}[form] + (4 * n * k // 128 if form == "int4" else 0))
        copies = max(2, -(-(512 << 20) // int(nbytes)))  # enough distinct weights to pass L2 each replay
        weights = []
        for _ in range(copies):
            w = torch.randn(n, k, device="cuda") / k**0.5
            if form == "bf16":
                weights.append(dict(weight=w.to(torch.bfloat16)))
            elif form == "fp8":
                q, s = quantize_weight_per_channel(w)
                weights.append(dict(weight=q, weight_scale=s))
            else:
                q, s, o = quantize_rtn(w, 128)
                weights.append(dict(weight=q, weight_scale=s, weight_offset=o, group=128))
            del w
        x = torch.randn(1, 2 * k if pro == "silu_mul" else k, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16)
        kw = dict(residual=res, norm_weight=nw) if pro == "rmsnorm" else {}
        outs, times = [], []
        for _, mod in versions:
            outs.append(mod.gemv(x, prologue=pro, **weights[0], **kw)[0].float())
            times.append(graph_us([lambda w=w, mod=mod: mod.gemv(x, prologue=pro, **w, **kw) for w in weights]))
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()  # a no-op unless a profiler waits for it
        matvec.gemv(x, prologue=pro, **weights[1], **kw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        diff = max(((o - outs[-1]).abs().max() / outs[-1].abs().max()).item() for o in outs)
        rows.append([form, f"{name} {n}x{k} ({pro})", f"{nbytes / 1e6:.1f}"]
                    + [f"{t:.1f} ({100 * nbytes / t / 1e-6 / bw:.0f}%)" for t in times] + [f"{diff:.1e}"])
        del weights
        torch.cuda.empty_cache()
print(table(rows))
# the tiles each version's autotuners chose (by key: N, K, prologue, ...), so a difference can be read as one of tiles
for name, mod in versions:
    for kernel in ("_gemv", "_gemv_int4"):
        cache = getattr(getattr(mod, kernel, None), "cache", {})
        for key, cfg in cache.items():
            print(f"{name} {kernel} {key[:3]}: {cfg}")
