"""vLLM as the peer of `slipstream bench throughput`: the same prompts and output lengths (the same seed-0 draws),
temperature 0.6, ignore_eos, max_model_len 4096, random ("dummy") weights, prefix caching off as in ours.

Usage, with vLLM and slipstream importable:
  python3 scripts/vllm_throughput.py QWEN3_0.6B_DIR [--runs 2] [--quantization fp8] [--kv-cache-dtype fp8]
Prints output and total tok/s per run."""
import argparse
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from slipstream.bench.engine_bench import nano_vllm_workload

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--runs", type=int, default=2)
p.add_argument("--quantization", default=None)
p.add_argument("--kv-cache-dtype", default="auto")
a = p.parse_args()
llm = LLM(model=a.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, seed=0, enable_prefix_caching=False,
          quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype)
prompts, lengths = nano_vllm_workload()
params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in lengths]
llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=16), use_tqdm=False)
for run in range(a.runs):
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"vLLM run {run}: {out_tokens} output tokens in {elapsed:.2f} s = {out_tokens / elapsed:.0f} output tok/s, "
          f"{(out_tokens + sum(map(len, prompts))) / elapsed:.0f} total tok/s", flush=True)
