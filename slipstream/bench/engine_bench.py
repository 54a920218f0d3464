"""Offline engine benchmarks: batch decode latency vs the HBM roofline, the nano-vllm throughput workload, and
the prefix-cache workloads (shared system prompt, multi-turn chat) with the cache on vs off."""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from typing import Any

import torch

from slipstream import LLM, SamplingParams
from slipstream.bench.common import (copy_bandwidth, gpu_name, model_dir, profiled, release_gpu_memory, table,
                                     watch_compiles)
from slipstream.config import ENGINE_OPTIONS
from slipstream.layers.moe import MoE
from slipstream.layers.quantization import METHODS as QUANTIZATION_METHODS
from slipstream.models.llama import VocabEmbedding


def _llm(model: str, **kw: Any) -> LLM:
    return LLM(model_dir(model), load_format="dummy", dtype="bfloat16", **kw)


def _timed(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> tuple[float, list]:
    torch.cuda.synchronize()
    with watch_compiles(f"{len(prompts)} timed requests"):
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, outs


def hf_decode_rate(model: str, batch: int, input_len: int, output_len: int) -> float:
    """HF transformers (eager, dynamic cache) on random weights of the same config: output tok/s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir(model))
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(10, cfg.vocab_size, (batch, input_len), device="cuda")
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    hf.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf.generate(ids, **kw)
    torch.cuda.synchronize()
    rate = batch * output_len / (time.perf_counter() - start)
    del hf
    release_gpu_memory()
    return rate


def active_weight_bytes(model: torch.nn.Module, batch: int) -> float:
    """Weight bytes one decode step of `batch` tokens must read: every parameter once (a tied output head's table
    once, as the head), except the embedding table, of which a step reads its tokens' rows, and a MoE layer's experts
    (and their scales, where quantized), which count only as far as tokens reach them: k of E for one token; for B
    tokens routed uniformly, E * (1 - (1 - k/E)^B)."""
    owner = {}  # each tensor once, by a module that reads it whole where one does (a tied table: the head)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in owner or isinstance(owner[id(p)][0], VocabEmbedding):
                owner[id(p)] = module, name, p
    total = 0.0
    for module, name, p in owner.values():
        nbytes = p.numel() * p.element_size()
        if isinstance(module, VocabEmbedding):
            nbytes *= min(batch, p.shape[0]) / p.shape[0]
        elif isinstance(module, MoE) and name.startswith(("w13", "w2")):
            e, k = module.cfg.num_experts, module.cfg.top_k
            nbytes *= 1 - (1 - k / e) ** batch
        total += nbytes
    return total


def latency(a: argparse.Namespace) -> list[dict]:
    """Decode tok/s at each batch size in turn, on one engine (one start-up and one set of CUDA graphs for a table of
    batch sizes), each against its own roofline: the weight bytes its tokens read plus their KV cache."""
    bw = copy_bandwidth(torch.device("cuda"))
    sizes = a.batch_size
    # the peer runs first, before our engine holds the GPU's memory
    peers = {b: hf_decode_rate(a.model, b, a.input_len, a.output_len) for b in sizes} if a.hf_peer else {}
    llm = _llm(a.model, max_model_len=a.max_model_len or a.input_len + a.output_len + 16, max_num_seqs=max(sizes),
               enforce_eager=a.enforce_eager, enable_prefix_caching=False, gpu_memory_utilization=a.gpu_memory_utilization,
               quantization=a.quantization, quantize_lm_head=a.quantize_lm_head, kv_cache_dtype=a.kv_cache_dtype)
    llm.engine.warm_up()
    vocab, runner = llm.engine.model_config.vocab_size, llm.engine.runner
    g = torch.Generator().manual_seed(0)
    full = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out, rows = [], [["batch", "engine", "decode tok/s", "% of roofline", "TTFT ms"]]
    for batch in sizes:
        prompts = [torch.randint(10, vocab, (a.input_len,), generator=g).tolist() for _ in range(batch)]
        for _ in range(2):
            llm.generate(prompts, full)
        ttfts = sorted(_timed(llm, prompts, first)[0] for _ in range(a.iters))
        totals = sorted(_timed(llm, prompts, full)[0] for _ in range(a.iters))
        if a.profile:
            print(f"profile of 32 decode steps at batch {batch}:")
            with profiled(a.profile):
                _timed(llm, prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        ttft, total = ttfts[len(ttfts) // 2], totals[len(totals) // 2]
        decode_rate = batch * (a.output_len - 1) / (total - ttft)
        weight_bytes = active_weight_bytes(runner.model, batch)
        # the pool's own dtype, at the mean context
        kv_bytes = batch * (a.input_len + a.output_len / 2) * runner.kv.bytes_per_block / runner.kv.block_size
        roofline = batch * bw / (weight_bytes + kv_bytes)
        peer = peers.get(batch)
        out.append(dict(bench="latency", gpu=gpu_name(), model=a.model, quantization=a.quantization,
                        quantize_lm_head=a.quantize_lm_head, kv_cache_dtype=a.kv_cache_dtype, batch_size=batch,
                        input_len=a.input_len, output_len=a.output_len, cuda_graphs=not a.enforce_eager, ttft_s=ttft,
                        e2e_s=total, decode_tok_s=decode_rate, weight_bytes=weight_bytes, kv_bytes_per_step=kv_bytes,
                        copy_bw_Bps=bw, roofline_tok_s=roofline, pct_of_roofline=100 * decode_rate / roofline,
                        hf_tok_s=peer))
        rows += [[str(batch), "slipstream", f"{decode_rate:.1f}", f"{100 * decode_rate / roofline:.1f}", f"{1e3 * ttft:.1f}"],
                 [str(batch), "roofline", f"{roofline:.1f}", "100.0",
                  f"({(weight_bytes + kv_bytes) / 1e9:.2f} GB/step at {bw / 1e12:.2f} TB/s)"]]
        if peer:
            rows.append([str(batch), "HF transformers (eager)", f"{peer:.1f}", f"{100 * peer / roofline:.1f}", "-"])
    print(table(rows))
    del llm
    release_gpu_memory()
    return out


def nano_vllm_workload(num_seqs: int = 256, max_len: int = 1024) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's throughput workload: seed 0, input and output lengths uniform in [100, max_len], random ids.
    Returns the prompts and each one's output length (scripts/vllm_throughput.py gives vLLM the same draws)."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_len))] for _ in range(num_seqs)]
    return prompts, [rng.randint(100, max_len) for _ in range(num_seqs)]


def throughput(a: argparse.Namespace) -> dict:
    """nano-vllm's workload (256 sequences, lengths in [100, 1024]), sampled at temperature 0.6 with ignore_eos."""
    llm = _llm(a.model, max_model_len=4096, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
               enforce_eager=a.enforce_eager, enable_prefix_caching=False, gpu_memory_utilization=a.gpu_memory_utilization,
               quantization=a.quantization, quantize_lm_head=a.quantize_lm_head, kv_cache_dtype=a.kv_cache_dtype)
    vocab = llm.engine.model_config.vocab_size
    prompts, lengths = nano_vllm_workload(a.num_seqs, a.max_len)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, seed=i) for i, n in enumerate(lengths)]
    assert max(max(p) for p in prompts) < vocab
    llm.engine.warm_up()
    runner, eng = llm.engine.runner, llm.engine
    wait0, steps0 = runner.gpu_wait_s, eng.stats.steps
    with profiled(a.profile):
        elapsed, outs = _timed(llm, prompts, params)
    out_tokens = sum(o.outputs[0].num_tokens for o in outs)
    cpu_share = 1 - (runner.gpu_wait_s - wait0) / elapsed
    res = dict(bench="throughput", gpu=gpu_name(), model=a.model, quantization=a.quantization,
               quantize_lm_head=a.quantize_lm_head, kv_cache_dtype=a.kv_cache_dtype, num_seqs=a.num_seqs, elapsed_s=elapsed,
               output_tokens=out_tokens, output_tok_s=out_tokens / elapsed,
               total_tok_s=(out_tokens + sum(map(len, prompts))) / elapsed, steps=eng.stats.steps - steps0,
               preemptions=eng.stats.num_preemptions, cpu_share_of_step_time=cpu_share)
    print(table([["engine", "output tok/s", "total tok/s", "steps", "CPU share of step time"],
                 ["slipstream", f"{res['output_tok_s']:.0f}", f"{res['total_tok_s']:.0f}", res["steps"], f"{100 * cpu_share:.1f}%"]]))
    del llm
    release_gpu_memory()
    return res


def prefix(a: argparse.Namespace) -> dict:
    """Shared long system prompt + short distinct suffixes, and a multi-turn chat replay; cache on vs off."""
    rng = random.Random(0)
    system = [rng.randint(10, 10000) for _ in range(a.system_len)]
    shared = [system + [rng.randint(10, 10000) for _ in range(a.suffix_len)] for _ in range(a.num_requests)]
    res: dict[str, Any] = dict(bench="prefix", gpu=gpu_name(), model=a.model, system_len=a.system_len,
                               suffix_len=a.suffix_len, num_requests=a.num_requests, output_len=a.output_len)
    rows = [["workload", "cache", "time s", "req/s", "mean TTFT ms", "hit rate"]]
    for on in (False, True):
        llm = _llm(a.model, max_model_len=8192, enable_prefix_caching=on, gpu_memory_utilization=a.gpu_memory_utilization)
        params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
        llm.engine.warm_up()
        elapsed, outs = _timed(llm, shared, params)
        ttft = sum(o.metrics.ttft for o in outs) / len(outs)
        hit = llm.engine.core.prefix_cache.stats.hit_rate if on else 0.0
        res[f"shared_{'on' if on else 'off'}"] = dict(time_s=elapsed, req_s=len(outs) / elapsed, mean_ttft_s=ttft, hit_rate=hit)
        rows.append(["shared system prompt", "on" if on else "off", f"{elapsed:.2f}", f"{len(outs) / elapsed:.1f}", f"{1e3 * ttft:.1f}", f"{hit:.2f}"])
        # multi-turn: every conversation resends its history plus a new user turn; rounds run concurrently
        histories = [system[: a.system_len // 4] + [rng.randint(10, 10000) for _ in range(64)] for _ in range(a.conversations)]
        total, ttfts, start = 0, [], time.perf_counter()
        for _ in range(a.turns):
            _, outs = _timed(llm, histories, params)
            for h, o in zip(histories, outs):
                h += o.outputs[0].token_ids + [rng.randint(10, 10000) for _ in range(64)]
                ttfts.append(o.metrics.ttft)
                total += 1
        chat_time = time.perf_counter() - start
        hit = llm.engine.core.prefix_cache.stats.hit_rate if on else 0.0
        res[f"chat_{'on' if on else 'off'}"] = dict(time_s=chat_time, req_s=total / chat_time, mean_ttft_s=sum(ttfts) / total)
        rows.append([f"multi-turn chat ({a.conversations}x{a.turns})", "on" if on else "off", f"{chat_time:.2f}",
                     f"{total / chat_time:.1f}", f"{1e3 * sum(ttfts) / total:.1f}", f"{hit:.2f}"])
        del llm
        release_gpu_memory()
    res["shared_speedup"] = res["shared_on"]["req_s"] / res["shared_off"]["req_s"]
    res["chat_speedup"] = res["chat_on"]["req_s"] / res["chat_off"]["req_s"]
    print(table(rows))
    print(f"speedup: shared prompt {res['shared_speedup']:.2f}x, multi-turn chat {res['chat_speedup']:.2f}x")
    return res


def fairness(a: argparse.Namespace) -> dict:
    """A stream is decoding when a long prompt arrives: the stream's inter-token gaps while that prompt prefills,
    with prefill chunks sized to --max-decode-stall and with no limit (one chunk up to the token budget)."""
    rng = random.Random(0)
    path, fmt = (a.model, "auto") if a.model.endswith(".gguf") else (model_dir(a.model), "dummy")
    llm = LLM(path, load_format=fmt, dtype=a.dtype, device=a.device, max_model_len=a.prompt_len + 512,
              max_num_batched_tokens=max(8192, a.prompt_len), gpu_memory_utilization=a.gpu_memory_utilization)
    llm.engine.warm_up()
    vocab = llm.engine.model_config.vocab_size
    long_prompt = [rng.randrange(10, vocab) for _ in range(a.prompt_len)]

    def gaps_while_prefilling(stall: float) -> tuple[list[float], float]:
        llm.reset_prefix_cache()  # the long prompt must be computed again, not found in the cache
        eng = llm.engine
        eng.core.config = replace(eng.core.config, scheduler=replace(eng.core.config.scheduler, max_decode_stall=stall))
        eng.add_request("stream", [rng.randrange(10, vocab) for _ in range(16)], SamplingParams(max_tokens=a.prompt_len, ignore_eos=True))
        for _ in range(8):  # the stream is decoding steadily
            eng.step()
        eng.add_request("long", long_prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        gaps, last, ttft, start = [], time.perf_counter(), None, time.perf_counter()
        while ttft is None:
            for out in eng.step():
                now = time.perf_counter()
                if out.request_id == "stream":
                    gaps.append(now - last)
                    last = now
                elif out.request_id == "long" and out.finished:
                    ttft = now - start
        eng.abort_request("stream")
        return sorted(gaps), ttft

    res: dict[str, Any] = dict(bench="fairness", gpu=gpu_name(), model=a.model, prompt_len=a.prompt_len)
    rows = [["prefill chunks", "stream gap p50 ms", "p99 ms", "max ms", "long prompt TTFT s"]]
    for label, stall in (("one chunk (no limit)", 0.0), (f"sized to {a.max_decode_stall} s", a.max_decode_stall)):
        # Twice, the first unmeasured: a first prefill of new shapes compiles kernels (on the H200 the first
        # one-chunk 4K prefill of the 8B shape stalled the stream 615 ms, ~6x its arithmetic).
        gaps_while_prefilling(stall)
        gaps, ttft = gaps_while_prefilling(stall)
        pct = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]  # noqa: E731
        res[label] = dict(gap_p50_s=pct(0.5), gap_p99_s=pct(0.99), gap_max_s=gaps[-1], ttft_s=ttft)
        rows.append([label, f"{1e3 * pct(0.5):.1f}", f"{1e3 * pct(0.99):.1f}", f"{1e3 * gaps[-1]:.1f}", f"{ttft:.2f}"])
    print(table(rows))
    return res


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="batch-N decode tok/s and TTFT vs the HBM roofline")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1],
                   help="one or more batch sizes, timed in turn on one engine")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--hf-peer", action="store_true", help="also time HF transformers on the same config")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's longest sequence (default: input + output + 16); a server's default is the "
                        "model's own, and its CUDA graphs are captured for it")
    p.set_defaults(bench_fn=latency)
    p = sub.add_parser("throughput", help="nano-vllm workload: output tok/s")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.set_defaults(bench_fn=throughput)
    p = sub.add_parser("prefix", help="prefix cache on vs off: shared system prompt and multi-turn chat")
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.set_defaults(bench_fn=prefix)
    p = sub.add_parser("fairness", help="a running stream's inter-token gaps while a long prompt prefills")
    p.add_argument("--model", default="qwen3-0.6b", help="bundled config name, HF dir (dummy weights) or .gguf file")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--max-decode-stall", type=float, default=0.25)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.set_defaults(bench_fn=fairness)
    for name in ("latency", "throughput"):
        sub.choices[name].add_argument("--quantization", default="auto", choices=QUANTIZATION_METHODS,
                                       help="weights of the linear layers (fp8: quantized at load)")
        sub.choices[name].add_argument("--quantize-lm-head", action="store_true",
                                       help="round the output head to the weights' format too")
        kv = ENGINE_OPTIONS["kv_cache_dtype"]
        sub.choices[name].add_argument(kv.flag, default=kv.default, choices=kv.choices, help=kv.help)
    for name in ("latency", "throughput", "prefix", "fairness"):
        q = sub.choices[name]
        q.add_argument("--enforce-eager", action="store_true")
        q.add_argument("--gpu-memory-utilization", type=float, default=0.85)
        q.add_argument("--json", default=None)
        q.add_argument("--profile", choices=["host", "gpu"], default=None)
