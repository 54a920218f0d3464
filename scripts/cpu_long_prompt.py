"""Prefill of one long prompt on the CPU: slipstream's `LLM` (the embedded model, float32, the torch attention
backend) against HF transformers' forward over the same tokens and GGUF weights, in one process.

    PYTHONPATH=. python3 scripts/cpu_long_prompt.py
"""
from __future__ import annotations

import os
import time

import torch
from transformers import AutoModelForCausalLM

from slipstream import LLM, SamplingParams
from slipstream.loader import embedded_model_path

WORDS = ("the quick brown fox jumps over the lazy dog while the river runs past old stone walls " * 400).split()


def main() -> None:
    llm = LLM(max_model_len=8192)
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    for n in (1000, 4000):
        start = time.perf_counter()
        out = llm.generate([" ".join(WORDS[:n])], SamplingParams(max_tokens=1, temperature=0))
        ours = time.perf_counter() - start
        ids = torch.tensor([out[0].prompt_token_ids])
        with torch.inference_mode():
            start = time.perf_counter()
            hf(ids)
            theirs = time.perf_counter() - start
        print(f"{ids.shape[1]} tokens: slipstream {ours:.2f} s, HF transformers' forward {theirs:.2f} s")


if __name__ == "__main__":
    main()
