"""`slipstream tune moe`: measure the fused MoE kernels' tiles for one model's MoE layer on this GPU and store the
fastest per token count, where the kernels look them up (kernels/moe.py: one table per GPU, layer shape and weight
format; a layer without one runs a heuristic and says so).

For each token count, every candidate tile (rows of pairs x output columns x K step, warps, pipeline stages) runs
the whole layer (both grouped GEMMs, the sort by expert) in a CUDA graph, experts drawn uniformly at random as a
trained router spreads them; so does the grouped GEMV, up to GEMV_TOKENS tokens; the fastest wins. A few hundred
candidates compile once each (minutes on an H200).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Callable

import torch
import triton

from slipstream.bench.common import gpu_name, graph_us, model_dir, table
from slipstream.config import ModelConfig
from slipstream.kernels.moe import GEMV_TOKENS, TUNED_DIR, Fp8Experts, Int4Experts, fused_moe, tiles_file
from slipstream.layers.quantization.fp8 import quantize_weight_blocks, quantize_weight_per_channel
from slipstream.layers.quantization.int4 import quantize_rtn
from slipstream.parallel.shard import split

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
WEIGHTS = ("bf16", "fp8", "fp8-block128", "int4")


def candidates(weights: str, elem_bytes: int, shared_memory: int) -> list[dict]:
    """Tiles worth trying: those whose pipeline stages fit in shared memory (an A tile and the gate and up tiles a
    stage), K steps inside one scale block for block-scaled FP8."""
    out = []
    for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (64, 128), (4, 8), (2, 3, 4)):
        if stages * (bm * bk + 2 * bk * bn) * elem_bytes > shared_memory - 4096:
            continue
        if weights.startswith("fp8-block") and int(weights.removeprefix("fp8-block")) % bk:
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return out


def tune(token_counts: list[int], tiles: list[dict], time_us: Callable[[int, dict], float]) -> dict[int, tuple[dict, float]]:
    """The fastest tiles per token count, by `time_us(tokens, tiles)` (inf where a tile fails), with their time."""
    best = {}
    for t in token_counts:
        timed = [(time_us(t, c), i) for i, c in enumerate(tiles)]
        us, i = min(timed)
        if us == float("inf"):
            raise RuntimeError(f"no tile ran the layer at {t} tokens")
        best[t] = (tiles[i], us)
    return best


def _layer(cfg: ModelConfig, tp: int, expert_parallel: bool) -> tuple[int, int, int, int]:
    """(experts, expert width, hidden, top-k) of one rank's share of the model's MoE layer."""
    moe = cfg.moe
    if moe is None:
        raise ValueError(f"{cfg.architecture} has no MoE layer to tune")
    e, inter = moe.num_experts, moe.intermediate_size
    if expert_parallel:  # rank 0's share, as the engine splits them
        e = split(e, tp, 0)[1]
    else:
        inter = split(inter, tp, 0)[1]
    return e, inter, cfg.hidden_size, moe.top_k


def run(a: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise ValueError("`slipstream tune moe` measures the MoE kernels on an NVIDIA GPU (CUDA) and none is available here")
    path = model_dir(a.model)
    with open(os.path.join(path, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    e, inter, h, k = _layer(cfg, a.tensor_parallel_size, a.enable_expert_parallel)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device=dev, generator=g, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, inter, device=dev, generator=g, dtype=torch.bfloat16) / inter**0.5
    quant = None
    if a.weights == "int4":  # groups of 128 columns, as AWQ and GPTQ checkpoints mostly have them
        (w13, s13, o13), (w2, s2, o2) = ([torch.stack(x) for x in zip(*(quantize_rtn(w[i], 128) for i in range(e)))]
                                         for w in (w13, w2))
        quant = Int4Experts(s13.float(), o13.float(), 128, s2.float(), o2.float(), 128)
    elif a.weights != "bf16":
        block = (128, 128) if a.weights == "fp8-block128" else None
        quant = (lambda w: quantize_weight_blocks(w, block)) if block else quantize_weight_per_channel
        (w13, s13), (w2, s2) = ([torch.stack(x) for x in zip(*(quant(w[i]) for i in range(e)))] for w in (w13, w2))
        quant = Fp8Experts(s13, s2, block)
    props = torch.cuda.get_device_properties(dev)
    tiles = [dict(GEMV=True)] + candidates(a.weights, 2, getattr(props, "shared_memory_per_block_optin", 96 << 10))
    inputs = {}

    def time_us(t: int, c: dict | None) -> float:
        if c is not None and c.get("GEMV") and t > GEMV_TOKENS:
            return float("inf")
        if t not in inputs:
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
            inputs[t] = (x, torch.rand(t, k, device=dev).softmax(-1), torch.rand(t, e, device=dev).topk(k, -1).indices)
        x, weights, ids = inputs[t]
        try:
            return graph_us([lambda: fused_moe(x, w13, w2, weights, ids, quant=quant, tiles=c)])
        except (RuntimeError, triton.runtime.errors.OutOfResources):
            return float("inf")

    print(f"tuning {len(tiles)} tiles x {len(a.tokens)} token counts: {e} experts of {inter} x {h}, top {k}, {a.weights} "
          f"on {gpu_name()}")
    best = tune(a.tokens, tiles, time_us)
    default = {t: time_us(t, None) for t in a.tokens}  # the heuristic (or the table already stored)
    path = write_table(best, a.out, tiles_file(e, inter, h, a.weights, props.name), props.name, a.model)
    rows = [["tokens", "tiles (M, N, K, warps, stages)", "tuned us", "before us", "before / tuned"]]
    out = []
    for t, (c, us) in best.items():
        form = ("grouped GEMV" if c.get("GEMV")
                else f"{c['BLOCK_M']}, {c['BLOCK_N']}, {c['BLOCK_K']}, {c['num_warps']}, {c['num_stages']}")
        rows.append([str(t), form, f"{us:.1f}", f"{default[t]:.1f}", f"{default[t] / us:.2f}"])
        out.append({"tokens": t, "tiles": c, "tuned_us": us, "before_us": default[t]})
    print(table(rows))
    print(f"wrote {path}")
    return out


def write_table(best: dict[int, tuple[dict, float]], directory: str, name: str, device: str, model: str) -> str:
    """The tile table as kernels/moe.py reads it; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        json.dump({"device": device, "triton": triton.__version__, "model": model,
                   "tiles": {str(t): c for t, (c, _) in best.items()}}, f, indent=1)
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="tune the fused MoE kernels' tiles for a model's MoE layer on this GPU")
    p.add_argument("--model", required=True, help="a bundled config name (qwen3-30b-a3b, mixtral-8x7b, glm-4.5-air), "
                                                   "a config.json or an HF directory")
    p.add_argument("--weights", default="bf16", choices=WEIGHTS, help="the experts' format: 16-bit, FP8 per row, FP8 "
                                                                       "in 128 x 128 blocks, 4-bit in groups of 128")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="token counts of a step to tune for")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks the layer is split over")
    p.add_argument("--enable-expert-parallel", action="store_true", help="ranks hold whole experts")
    p.add_argument("--out", default=TUNED_DIR, help="where the table goes (default: where the kernels look)")
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=run)
