"""Tokens a decode step yields with n-gram drafts at batch 1, on the CPU (the embedded model, fp32, greedy): with every
verifying step read before the next is planned (overlap off) and with the next planned behind it where the engine does
so (overlap on). What the steps cost is the GPU's (on an H100 at batch 1: a plain step 0.7 ms, a verifying step of 9
tokens 1.2-1.3 ms, and 0.2 ms more when read before the next: docs/benchmarks.md, lease BD); this counts what is
independent of the machine: the steps and the tokens, then prices them at those costs.

usage: PYTHONPATH=. python3 scripts/spec_steps.py [K ...]   (default 8; 6 quote-workload prompts, 128 tokens each)
"""
from __future__ import annotations

import sys

from slipstream import LLM, SamplingParams
from slipstream.bench.spec_bench import quote_prompts
from slipstream.loader import embedded_model_path


# H100 step costs at batch 1 (ms): a plain step and a verifying step (k = 8) read before the next, on the clock
# (lease BA); a verifying step with the next launched behind it (lease BD, clock = device)
PLAIN_MS, READ_FIRST_MS, BEHIND_MS = 0.694, 1.376, 1.27


def main() -> None:
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for k in [int(x) for x in sys.argv[1:]] or [8]:
        for overlap in ("off", "on"):
            llm = LLM(embedded_model_path(), dtype="float32", device="cpu", max_model_len=2048, speculative_method="ngram",
                      num_speculative_tokens=k, speculative_adaptive=False, async_scheduling=overlap)
            core = llm.engine.core
            behind = [0]  # verifying steps the next step was launched behind
            launch = core._launch
            core._launch = lambda batch, *a: (behind.__setitem__(0, behind[0] + bool(core._inflight and core._inflight.drafts)),
                                              launch(batch, *a))[1]
            st = core.stats
            prompts = quote_prompts(6)
            for p in prompts:  # one at a time: batch 1
                llm.generate([llm.apply_chat_template([{"role": "user", "content": p}])], params)
            tokens = st.generation_tokens - len(prompts)  # (each prompt's step draws its first token)
            ms = (st.decode_steps - st.drafts) * PLAIN_MS + behind[0] * BEHIND_MS + (st.drafts - behind[0]) * READ_FIRST_MS
            print(f"k = {k}, overlap {overlap}: {st.decode_steps} decode steps ({st.drafts} verifying, {behind[0]} of them "
                  f"with the next behind), {tokens} decode tokens, {tokens / st.decode_steps:.2f} a step; drafts accepted "
                  f"{st.accepted_draft_tokens} of {st.draft_tokens}; at the H100's costs {tokens / ms:.2f} tokens a ms")


if __name__ == "__main__":
    main()
