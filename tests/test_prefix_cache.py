"""Prefix cache: outputs identical with the cache on and off for overlapping prompts, eviction under a tiny pool,
concurrent requests with a common uncached prefix computing it once, and a prompt scored beside its cached pages."""
import pytest

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams


@pytest.fixture(scope="module")
def engines(gguf_path):
    kw = dict(dtype="float32", device="cpu", block_size=8, max_model_len=128, max_num_batched_tokens=64)
    # 18 pages of 8 tokens: far less than the prompts below need together, so the cache must evict
    return {on: LLM(gguf_path, enable_prefix_caching=on, num_blocks=18, **kw) for on in (False, True)}


def overlapping_prompts(llm):
    system = "You are a terse assistant. Answer in one short sentence and never use lists."
    chat = lambda *turns: llm.apply_chat_template([{"role": "system", "content": system}, *turns])  # noqa: E731
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    base = chat(u("Name a planet."))
    return [
        chat(u("What is the capital of Italy?")),  # shared system prompt
        chat(u("What is the capital of Spain?")),
        chat(u("Name a planet."), a("Mars."), u("Why is it red?")),  # branching conversations
        chat(u("Name a planet."), a("Mars."), u("How far is it?")),
        base,  # a prompt that is a prefix of another
        base + llm.engine.tokenize("Jupiter"),
        chat(u("What is the capital of Italy?")),  # exact duplicate
    ]


def test_outputs_identical_with_and_without_cache(engines):
    params = SamplingParams(temperature=0, max_tokens=12)
    off, on = engines[False], engines[True]
    prompts = overlapping_prompts(off)
    ref = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    cache = on.engine.core.prefix_cache
    for round_ in range(2):  # the second round hits what the first cached (minus what was evicted)
        got = [o.outputs[0].token_ids for o in on.generate(prompts, params)]
        assert got == ref, f"round {round_}"
    # one at a time: each request finds what the earlier ones left
    assert [on.generate(p, params)[0].outputs[0].token_ids for p in prompts] == ref
    assert cache.stats.hit_tokens > 0 and cache.stats.evicted_blocks > 0
    assert_no_leak(off)
    assert_no_leak(on)


def test_samples_of_one_request_share_the_prompt(engines):
    """n > 1: the first sample computes the prompt, its siblings start from the cached pages."""
    on = engines[True]
    cache = on.engine.core.prefix_cache
    cache.clear()
    prompt = on.engine.tokenize("Once upon a time there was a small robot who lived in a lighthouse by the sea and")
    before_q, before_h = cache.stats.query_tokens, cache.stats.hit_tokens
    out = on.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=3))[0]
    assert len(out.outputs) == 4
    full_pages = (len(prompt) - 1) // 8 * 8
    assert cache.stats.hit_tokens - before_h == 3 * full_pages  # three siblings reuse every full prompt page
    assert cache.stats.query_tokens - before_q == 4 * len(prompt)
    assert_no_leak(on)


def test_shared_prefix_len_finds_the_common_cached_pages():
    from slipstream.runner.inputs import shared_prefix_len

    common = list(range(100, 140))  # 40 shared pages = 640 tokens of 16
    tables = [common + [1, 2], common[:30] + [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], common + [14]]
    assert shared_prefix_len(tables, [670, 660, 645], 16) == 30 * 16
    assert shared_prefix_len(tables[::2], [670, 645], 16) == 40 * 16
    assert shared_prefix_len(tables[::2], [670, 641], 16) == 40 * 16  # the newest token starts a page of its own
    assert shared_prefix_len(tables[::2], [670, 640], 16) == 39 * 16  # the newest token is in the last shared page
    assert shared_prefix_len([common, [7] + common[1:]], [700, 700], 16) == 0
    assert shared_prefix_len([common[:10], common[:10]], [160, 160], 16) == 0  # 144 tokens: below the threshold
    assert shared_prefix_len([common], [700], 16) == 0


def test_a_scored_prompt_beside_its_cached_pages_keeps_the_pool_whole(engines):
    """prompt_logprobs computes a prompt without the cache even where its pages are cached: its later pages must not
    be cached below cached pages it does not hold (those were then counted free but could not be evicted, and the
    engine died allocating: "out of KV blocks")."""
    on = engines[True]
    on.engine.core.prefix_cache.clear()
    a = list(range(1000, 1040))  # five pages, cached
    on.generate([a], SamplingParams(temperature=0, max_tokens=1))
    b = a[:32] + list(range(2000, 2050))  # a's first four pages, then 50 tokens: with 20 out, 13 of the 18 pages
    c = list(range(3000, 3020))  # with 20 out, the other 5: a's cached pages must be evicted for both to run
    outs = on.generate([b, c], [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1),
                                SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20]
    assert_no_leak(on)
