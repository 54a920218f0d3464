"""Sampler filters on synthetic logits, seeded reproducibility independent of batch mates, stop conditions."""
import pytest
import torch

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams
from slipstream.kernels.hash import exponential_noise, unit_interval
from slipstream.layers.sampler import Penalties, SamplingBatch, sample

V = 64


def batch(S: int, **kw) -> SamplingBatch:
    base = dict(
        temperature=torch.ones(S), top_k=torch.full((S,), V), top_p=torch.ones(S), min_p=torch.zeros(S),
        seeds=torch.arange(S, dtype=torch.int64), positions=torch.zeros(S, dtype=torch.int64), all_greedy=False,
        use_top_k_top_p=False, use_min_p=False, max_logprobs=None,
    )
    base.update(kw)
    return SamplingBatch(**base)


def draws(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """n independent draws per row (different positions act as independent streams)."""
    S = logits.shape[0]
    out = [sample(logits, batch(S, positions=torch.full((S,), i, dtype=torch.int64), **kw)).tokens for i in range(n)]
    return torch.stack(out, 1)


def test_top_k_never_emits_a_filtered_token():
    logits = torch.randn(8, V) * 3
    k = torch.tensor([1, 2, 5, 10, 1, 3, 64, 7])
    toks = draws(logits, 200, top_k=k, use_top_k_top_p=True)
    ranks = logits.argsort(-1, descending=True).argsort(-1)  # rank of each token in its row
    assert (ranks.gather(1, toks) < k.unsqueeze(1)).all()
    assert (toks[0] == logits[0].argmax()).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.randn(6, V) * 2
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.75, 1.0])
    toks = draws(logits, 300, top_p=top_p, use_top_k_top_p=True)
    probs = logits.softmax(-1)
    for r in range(6):
        p_sorted, order = probs[r].sort(descending=True)
        before = p_sorted.cumsum(0) - p_sorted
        allowed = set(order[before < top_p[r]].tolist())
        assert set(toks[r].tolist()) <= allowed


def test_rows_without_top_p_keep_every_token_beside_rows_with_it():
    """A row with top_p 1 beside one with top-p: the running sum of a large vocabulary's sorted probabilities reaches
    the row's total (summed in another order) before its tail, which then was dropped: a seeded draw depended on the
    batch mates."""
    from slipstream.layers.sampler import filter_probs

    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(2, 49152, generator=g) * 4).softmax(-1)
    b = batch(2, top_k=torch.full((2,), 49152), top_p=torch.tensor([1.0, 0.9]), use_top_k_top_p=True)
    assert torch.equal(filter_probs(probs, b)[0], probs[0])


def test_min_p_drops_unlikely_tokens():
    logits = torch.randn(4, V) * 3
    min_p = torch.tensor([0.05, 0.2, 0.5, 0.9])
    toks = draws(logits, 300, min_p=min_p, use_min_p=True)
    probs = logits.softmax(-1)
    floor = min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
    assert (probs.gather(1, toks) >= floor).all()


def test_draws_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0] + [-30.0] * (V - 4)])
    toks = draws(logits, 4000)[0]
    freq = torch.bincount(toks, minlength=V)[:4].float() / 4000
    assert torch.allclose(freq, logits[0, :4].softmax(-1), atol=0.03)


def test_uniforms_stay_inside_the_open_interval():
    """The extreme hashes (all bits clear, all set) map strictly inside (0, 1) in float32: noise E = -log(u) is
    never 0, so p / E is never inf (a token that always wins) or NaN (a filtered token argmax would pick)."""
    u = unit_interval(torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)], dtype=torch.int64))
    assert bool((u > 0).all() and (u < 1).all()), u
    assert bool((-torch.log(u) > 0).all())


def test_noise_is_a_function_of_seed_and_position_only():
    a = exponential_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), V)
    b = exponential_noise(torch.tensor([99, 7]), torch.tensor([0, 3]), V)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert (a > 0).all()


def test_penalties_and_bias():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    pen = Penalties(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]), counts, seen)
    b = batch(1, penalties=pen, all_greedy=True, max_logprobs=0,
              bias=(torch.tensor([0]), torch.tensor([3]), torch.tensor([5.0])))
    out = sample(logits, b)
    # adjusted: [1.0, -4 - 0.5 - 0.5, 1.0, 5.5] -> token 3; logprobs are those of the raw logits
    assert out.tokens.item() == 3
    assert out.logprobs[0, 0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 3].item())


def test_seeded_output_independent_of_batch_mates(fresh):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234)
    alone = fresh.generate("Tell me a story about a cat", p)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=n, seed=None) for n in (5, 17, 9)]
    mixed = fresh.generate(["Hello", "Tell me a story about a cat", "Numbers: 1 2 3", "Why?"], [others[0], p, others[1], others[2]])
    assert mixed[1].outputs[0].token_ids == alone
    again = fresh.generate("Tell me a story about a cat", p)[0].outputs[0].token_ids
    assert again == alone
    different = fresh.generate("Tell me a story about a cat", SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=4321))
    assert different[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_share_the_prompt(fresh):
    out = fresh.generate("My favourite fruit is", SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 10 for o in out.outputs)


def test_stop_strings_are_honoured_and_excluded(fresh):
    base = fresh.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert " 8," in base.text, base.text
    out = fresh.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[" 8,", "zzz"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 8,"
    assert out.text == base.text[: base.text.index(" 8,")]
    inc = fresh.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[" 8,"], include_stop_str_in_output=True))
    assert inc[0].outputs[0].text.endswith(" 8,")


def test_stop_token_text_is_kept_when_asked(fresh):
    """include_stop_str_in_output covers a stop token's text too (as vLLM's), streamed and not."""
    prompt = "1, 2, 3, 4, 5,"
    ids = fresh.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    k = next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])  # a token's first appearance, not the first
    cut = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[k]])
    kept = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[ids[k]], include_stop_str_in_output=True)
    without, with_ = (fresh.generate(prompt, p)[0].outputs[0] for p in (cut, kept))
    assert without.token_ids == with_.token_ids == ids[: k + 1] and with_.stop_reason == ids[k]
    assert with_.text == fresh.tokenizer.decode(ids[: k + 1]) != without.text == fresh.tokenizer.decode(ids[:k])
    assert "".join(o.outputs[0].delta_text for o in fresh.stream(prompt, kept)) == with_.text


def test_a_character_cut_by_max_tokens_reads_alike_streamed_and_not(fresh):
    """Tokens that end inside a character: the one-decode text of a request that is not streamed ended in U+FFFD
    where streaming holds the incomplete character back."""
    from slipstream.engine.detokenizer import IncrementalDetokenizer

    tok = fresh.tokenizer
    prompt, ids = tok.encode("Say it with an emoji:"), tok.encode(" every step of the way.🔍 and 日本語")
    for cut in range(1, len(ids) + 1):
        stepped = IncrementalDetokenizer(tok, prompt)
        streamed = "".join(stepped.step(t) for t in ids[:cut])
        assert IncrementalDetokenizer(tok, prompt).decode_all(ids[:cut]) == streamed, cut
        assert "\ufffd" not in streamed


def test_streaming_never_releases_a_stop_string_prefix(fresh):
    params = SamplingParams(temperature=0, max_tokens=20, stop=[" 8,"])
    deltas = [o.outputs[0].delta_text for o in fresh.stream("1, 2, 3, 4, 5,", params)]
    full = fresh.generate("1, 2, 3, 4, 5,", params)[0].outputs[0].text
    assert "".join(deltas) == full and " 8" not in "".join(deltas)


def test_a_streamed_report_keeps_its_own_tokens_when_read_late(fresh):
    """Reports share their sequence's token and logprob lists (a report costs what is new in it): each one read after
    the stream has ended still holds exactly the tokens it reported, its deltas the difference from the one before."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    reports = [o.outputs[0] for o in fresh.stream("1, 2, 3, 4, 5,", params)]  # all read after the last one
    final = fresh.generate("1, 2, 3, 4, 5,", params)[0].outputs[0]
    assert len(reports) > 3 and reports[-1].token_ids == final.token_ids and len(final.token_ids) == 12
    seen = 0
    for r in reports:
        assert r.token_ids == final.token_ids[: r.num_tokens] == final.token_ids[:seen] + r.delta_token_ids
        assert r.logprobs == final.logprobs[: r.num_tokens] and r.delta_logprobs == final.logprobs[seen : r.num_tokens]
        seen = r.num_tokens
    assert "num_tokens=12" in repr(reports[-1]) and "all_token_ids" not in repr(reports[-1])


def test_stop_token_ids_min_tokens_and_ignore_eos(fresh):
    greedy = fresh.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert greedy.finish_reason == "stop"  # ends on EOS
    n = len(greedy.token_ids)
    forced = fresh.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True))
    assert len(forced[0].outputs[0].token_ids) == n + 5 and forced[0].outputs[0].finish_reason == "length"
    longer = fresh.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=60, min_tokens=n + 3))
    assert len(longer[0].outputs[0].token_ids) >= n + 3
    stop_tok = greedy.token_ids[1]
    cut = fresh.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok]))
    o = cut[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_tok and o.token_ids == greedy.token_ids[:2]


def test_logprobs_top_n(fresh):
    o = fresh.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    for tok, lp in zip(o.token_ids, o.logprobs):
        assert len(lp) in (3, 4) and tok in lp  # sampled token plus the top 3 (it is usually one of them)
        assert max(lp.values()) == lp[tok]  # greedy: the sampled token is the most likely
    assert o.cumulative_logprob == sum(lp[t] for t, lp in zip(o.token_ids, o.logprobs)) < 0
    plain = fresh.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert plain.cumulative_logprob is None


def _teacher_forced(llm, prompt_ids, new):
    """Greedy continuation and each drawn token's logprob, as decoding computes them."""
    o = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=0))[0].outputs[0]
    return o.token_ids, [lp[t] for t, lp in zip(o.token_ids, o.logprobs)]


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_agree_with_decoding(smollm, gguf_path, chunk):
    """A prompt token's logprob given the tokens before it is what decoding assigned that token when it drew it:
    score the prompt + greedy continuation, compare the continuation's part (prefilled in one pass, or in chunks of
    7 tokens, whose last rows score the next chunk's first token). With the prompt in the prefix cache already,
    the scores are complete all the same (a cached prefix is not used then); n = 2 scores once."""
    llm = smollm if chunk is None else LLM(gguf_path, dtype="float32", device="cpu",
                                            max_model_len=512, max_num_batched_tokens=chunk)
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    gen, lps = _teacher_forced(llm, prompt, 8)
    full = prompt + gen
    llm.generate([full], SamplingParams(max_tokens=1))  # the whole text is now in the prefix cache
    out = llm.generate([full], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3, n=2))[0]
    scores = out.prompt_logprobs
    assert len(scores) == len(full) and scores[0] is None
    for j, (tok, lp) in enumerate(zip(gen, lps)):
        rank, top = scores[len(prompt) + j]
        assert next(iter(top)) == tok and top[tok] == pytest.approx(lp, abs=2e-4), j
        assert rank == 1 and len(top) == 3  # greedy drew the most likely token, which is also among the top 3
    for pos, (rank, top) in enumerate(scores[1:], 1):
        assert next(iter(top)) == full[pos] and rank >= 1 and 3 <= len(top) <= 4
        assert sum(v > top[full[pos]] for v in top.values()) == min(rank - 1, 3)
    assert_no_leak(llm)
