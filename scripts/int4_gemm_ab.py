"""Same lease, same process: the W4A16 GEMM of another version of kernels/int4.py (its file given on the command line,
e.g. main's, copied into an ignored folder before the call) against this tree's, at a few rows of x (decode batches),
on the Llama-3.1-8B projections with 4-bit weights (groups of 128, round-to-nearest), against bf16 cuBLAS. Each is
replayed in a CUDA graph on weights that rotate past L2; the tile this tree's autotuner chose is printed.

    git show main:slipstream/kernels/int4.py > .ab/int4_main.py      (here, then carry .ab)
    python3 scripts/int4_gemm_ab.py .ab/int4_main.py [ROWS ...]      (default rows: 4 16)
"""
import sys

import torch
import triton

from slipstream.bench.common import copy_bandwidth, graph_us, module_from_file, table
from slipstream.bench.kernels_bench import PROJECTIONS
from slipstream.kernels import int4
from slipstream.layers.quantization.int4 import quantize_rtn

other = module_from_file(sys.argv[1])
bw = copy_bandwidth(torch.device("cuda"))
print(torch.cuda.get_device_name(), "triton", triton.__version__, f"copy {bw / 1e12:.2f} TB/s")
rows = [["M", "projection", "other us (% copy)", "this tree us (% copy)", "bf16 cuBLAS us",
         "max abs. error other / this", "this tree's tile"]]
for m in [int(a) for a in sys.argv[2:]] or [4, 16]:
    total = [0.0, 0.0, 0.0]
    for name, n, k, _ in PROJECTIONS[:4]:
        copies = max(2, -(-(512 << 20) // (2 * n * k)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        packed = [quantize_rtn(w, 128) for w in ws]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ int4.dequantize(*packed[0], 128, torch.float32).T
        errors = [(f(x, *packed[0], 128).float() - ref).abs().max().item() for f in (other.w4a16_gemm, int4.w4a16_gemm)]
        times = [graph_us([lambda q=q, f=f: f(x, *q, 128) for q in packed]) for f in (other.w4a16_gemm, int4.w4a16_gemm)]
        times.append(graph_us([lambda w=w: x @ w.T for w in ws]))
        total = [a + b for a, b in zip(total, times)]
        nbytes = n * k // 2 + 4 * n * (k // 128)
        tile = [str(c) for key, c in int4._w4a16_decode.cache.items() if key[:2] == (n, k)] if m <= 16 else ["fixed"]
        rows.append([m, name] + [f"{t:.1f} ({100 * nbytes / t / 1e-6 / bw:.1f}%)" for t in times[:2]] +
                    [f"{times[2]:.1f}", f"{errors[0]:.3g} / {errors[1]:.3g}", " ".join(tile)])
        del ws, packed
    rows.append([m, "four projections", f"{total[0]:.1f}", f"{total[1]:.1f}", f"{total[2]:.1f}",
                 f"bf16 / this tree {total[2] / total[1]:.2f}x", f"bf16 / other {total[2] / total[0]:.2f}x"])
print(table(rows))
