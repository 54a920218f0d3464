"""Tokens a decode step yields with n-gram drafts at batch 1, on the CPU (the embedded model, fp32, greedy): with every
verifying step read before the next is planned (overlap off) and with the next planned behind it (overlap on). On a GPU
at batch 1 a verifying step's kernels cost what a plain step's do (docs/benchmarks.md, lease BB); read before the next
is planned it costs about two, planned behind it one, and a step after rejected drafts was planned on a wrong guess.
This counts what is independent of the machine: the steps and the tokens.

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
