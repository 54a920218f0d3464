"""Tokens a decode step yields with n-gram drafts at batch 1, on the CPU (the embedded model, fp32, greedy): with every
verifying step read before the next is planned (overlap off) and with the next planned behind it where the engine does
so (overlap on). What the steps cost is the GPU's (on an H100 at batch 1: a plain step 0.7 ms, a verifying step of 9
tokens 1.2-1.3 ms, and 0.2 ms more when read before the next: docs/benchmarks.md, lease BD); this counts what is
independent of the machine: the steps and the tokens.

usage: PYTHONPATH=. python3 scripts/spec_steps.py [K ...]   (default 8; 6 quote-workload prompts, 128 tokens each)
"""
from __future__ import annotations

import sys

from slipstream import LLM, SamplingParams
from slipstream.bench.spec_bench import quote_prompts
from slipstream.loader import embedded_model_path


def main() -> None:
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for k in [int(x) for x in sys.argv[1:]] or [8]:
        for overlap in ("off", "on"):
            llm = LLM(embedded_model_path(), dtype="float32", device="cpu", max_model_len=2048, speculative_method="ngram",
                      num_speculative_tokens=k, speculative_adaptive=False, async_scheduling=overlap)
            st = llm.engine.core.stats
            for p in quote_prompts(6):  # one at a time: batch 1
                llm.generate([llm.apply_chat_template([{"role": "user", "content": p}])], params)
            print(f"k = {k}, overlap {overlap}: {st.decode_steps} decode steps ({st.drafts} verifying), "
                  f"{st.generation_tokens} tokens, {st.generation_tokens / st.decode_steps:.2f} a step; drafts accepted "
                  f"{st.accepted_draft_tokens} of {st.draft_tokens}")


if __name__ == "__main__":
    main()
