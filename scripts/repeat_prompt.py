"""On a GPU: does a prompt whose head the prefix cache holds run as fast as a fresh one? The Llama-3.1-8B shape
(random weights), batch 1, 128 tokens a run: a 300-token prompt, an 85-token one, then each again (the second time
its whole pages are cached), each run's time and the Triton kernels it compiled (a compile inside a run is a stall
that the engine's warm-up should have taken). docs/benchmarks.md (eighteenth week) has the runs that found one.

usage: python3 scripts/repeat_prompt.py [MODEL]   (default: the bundled llama-3.1-8b config, random weights)
"""
from __future__ import annotations

import sys
import time

import torch

from slipstream import LLM, SamplingParams
from slipstream.bench.common import model_dir, watch_compiles


def main() -> None:
    llm = LLM(model_dir(sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"), load_format="dummy", dtype="bfloat16",
              max_model_len=2048, max_num_seqs=1, gpu_memory_utilization=0.85)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    long, short = list(range(100, 400)), [(7 * j + 3) % 1000 + 10 for j in range(85)]
    cuda = llm.engine.runner.device.type == "cuda"
    for name, prompt in (("300 tokens", long), ("85 tokens", short), ("300 tokens again", long),
                         ("85 tokens again", short)):
        if cuda:
            torch.cuda.synchronize()
        with watch_compiles(name) as compiled:
            start = time.perf_counter()
            out = llm.generate([prompt], params)[0]
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        n = len(out.outputs[0].token_ids)
        print(f"{name}: {n} tokens in {seconds:.3f} s ({n / seconds:.1f} tok/s), {out.metrics.num_cached_tokens} prompt "
              f"tokens cached, {len(compiled)} kernels compiled", flush=True)


if __name__ == "__main__":
    main()
