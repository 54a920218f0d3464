"""The embedded SmolLM2 (GGUF) through slipstream vs HF transformers on the same weights: concurrent prompts,
chunked prefill, mixed prefill+decode steps and preemption; greedy tokens identical, logprobs within 1e-3."""
import pytest

from conftest import assert_no_leak
from hf_reference import hf_greedy
from slipstream import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three primary colors:",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books. One day the dragon",
    "1, 2, 3, 4, 5,",
    "Translate to French: Good morning, my friend.",
    "Explain in one sentence why the sky is blue, and then explain why sunsets are red and orange.",
    "Q: What is 12 plus 30?\nA:",
    "The quick brown fox",
]
MAX_TOKENS = [24, 9, 30, 5, 20, 17, 12, 28, 6, 21]


def _run(gguf_path, hf_smollm, prefix_caching: bool):
    # 16-token pages, 14 pages (224 slots) and a 40-token step budget: prompts are chunked, decodes share steps
    # with prefill chunks, and ten sequences of up to ~60 tokens cannot all fit, so some are preempted.
    llm = LLM(
        gguf_path, dtype="float32", device="cpu", block_size=16, num_blocks=14, max_model_len=224,
        max_num_batched_tokens=40, enable_prefix_caching=prefix_caching,
    )
    eng = llm.engine
    chat = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    raw = [eng.tokenize(p) for p in PROMPTS[4:]]
    prompts = chat + raw
    seen = {"chunked": False, "mixed": False}
    schedule = eng.scheduler.schedule

    def spy(*args, **kwargs):
        batch = schedule(*args, **kwargs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens + n < seq.num_prompt_tokens:
                seen["chunked"] = True
        kinds = {n == 1 and s.num_computed_tokens >= s.num_prompt_tokens for s, n in zip(batch.seqs, batch.num_new_tokens)}
        seen["mixed"] |= kinds == {True, False}
        return batch

    eng.scheduler.schedule = spy
    params = [SamplingParams(temperature=0, max_tokens=m, logprobs=0) for m in MAX_TOKENS]
    outs = llm.generate(prompts, params)
    assert seen["chunked"] and seen["mixed"], seen
    assert eng.stats.num_preemptions >= 1
    for prompt, out, m in zip(prompts, outs, MAX_TOKENS):
        ref_tokens, ref_lps = hf_greedy(hf_smollm, prompt, m, eng.eos_ids)
        o = out.outputs[0]
        assert o.token_ids == ref_tokens, (llm.tokenizer.decode(prompt), o.text)
        ours = [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_lps)) < 1e-3
        assert o.finish_reason == ("stop" if ref_tokens[-1] in eng.eos_ids and len(ref_tokens) <= m else "length")
    assert_no_leak(llm)
    return outs


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_greedy_matches_hf_under_pressure(gguf_path, hf_smollm, prefix_caching):
    _run(gguf_path, hf_smollm, prefix_caching)


def test_answers_capital_of_france(fresh):
    out = fresh.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in out[0].outputs[0].text
