"""Speculative decoding with the n-gram (prompt lookup) proposer: its index against a brute-force search, and the
engine's output with speculation on exactly equal to the output without it (greedy, seeded sampling with
logprobs, penalties, n > 1, stop strings), with fewer steps where the text repeats; a draft model likewise; and
`bench speculative`'s bounds (a drafter always right, one always wrong)."""
import json
import os
import random

import pytest

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams
from slipstream.config import EngineConfig
from slipstream.engine.proposer import NgramProposer


def brute_force(ids, k, min_n, max_n):
    for n in range(min(max_n, len(ids)), min_n - 1, -1):
        for end in range(len(ids) - 1, n - 1, -1):  # the latest earlier occurrence of the last n tokens
            if ids[end - n : end] == ids[len(ids) - n :]:
                return ids[end : end + k]
    return []


def test_ngram_index_matches_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        prop, k = NgramProposer(min_n=rng.randint(1, 2), max_n=rng.randint(2, 4)), rng.randint(1, 5)
        # six token ids: small ones, or ids up to 2^32 - 1 (an n-gram's key packs its tokens 32 bits each)
        vocab = [0, 1, 2, 3, 4, 5] if trial % 2 else [0, 1, 65535, 65536, 151935, 2**32 - 1]
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 6))]
        for _ in range(30):  # tokens arrive a few at a time, as accepted drafts do
            assert prop.propose(7, ids, k) == brute_force(ids, k, prop.min_n, prop.max_n), (trial, ids)
            ids += [rng.choice(vocab) for _ in range(rng.randint(1, 3))]
    prop = NgramProposer()
    assert prop.propose(1, [5, 6, 7, 8, 9, 5, 6], 4) == [7, 8, 9, 5]
    assert prop.propose(2, [5, 6, 7, 8, 9, 5, 6], 2) == [7, 8]  # the limit caps the drafts
    assert prop.propose(3, [1, 2, 3, 4], 4) == []
    prop.forget(1)
    assert 1 not in prop._index


def test_first_guesses_match_brute_force():
    """The proposer's first guess for each output token that arrived, drafted or not, looks only at the tokens before
    it; the prompt is indexed, not guessed."""
    from types import SimpleNamespace

    rng = random.Random(1)
    for trial in range(30):
        prop = NgramProposer(min_n=rng.randint(1, 2), max_n=rng.randint(2, 4))
        ids = [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(1, 8))]
        seq = SimpleNamespace(seq_id=3, token_ids=ids, num_prompt_tokens=len(ids))
        for _ in range(20):  # tokens arrive a few at a time; now and then a drafting step indexes them first
            if rng.random() < 0.3:
                prop.propose(3, ids, 4)
            else:
                first = max(prop._index[3][0] if 3 in prop._index else 0, seq.num_prompt_tokens)
                want = sum(brute_force(ids[:i], 1, prop.min_n, prop.max_n) == [ids[i]] for i in range(first, len(ids)))
                assert prop.first_guesses([seq]) == (want, len(ids) - first), (trial, ids)
                assert prop._index[3][0] == len(ids)
            ids += [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(1, 3))]
        assert prop.propose(3, ids, 4) == brute_force(ids, 4, prop.min_n, prop.max_n)  # the index stays whole
    # a guess per output token, against the lookup over the tokens before it
    prop = NgramProposer()
    ids = [5, 6, 7, 8, 9, 5, 6, 7, 1, 5, 6, 2]
    seq = SimpleNamespace(seq_id=1, token_ids=ids[:5], num_prompt_tokens=5)
    assert prop.first_guesses([seq]) == (0, 0)
    seq.token_ids = ids
    want = sum(brute_force(ids[:i], 1, prop.min_n, prop.max_n) == [ids[i]] for i in range(5, len(ids)))
    assert prop.first_guesses([seq]) == (want, len(ids) - 5) and want == 1  # 7 after 5, 6 (then 2 where 7 was guessed)


def test_speculation_needs_synchronous_steps():
    """A drafter with state of its own (a model, a head) needs every step read before the next; n-gram lookup
    overlaps the steps it drafts nothing for."""
    with pytest.raises(ValueError, match="speculative_method='mtp'"):
        EngineConfig.from_options(None, speculative_method="mtp", async_scheduling="on")
    assert EngineConfig.from_options(None, speculative_method="ngram", async_scheduling="on").async_scheduling == "on"
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig.from_options(None, speculative_method="ngram", num_speculative_tokens=0)


LIST = ("Copy this list twice: red, orange, yellow, green, blue, indigo, violet, black, white, gray, pink, brown. "
        "First copy: red, orange, yellow,")
PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=24, logprobs=2, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.6, seed=5, repetition_penalty=1.1, frequency_penalty=0.2, max_tokens=24,
                                ignore_eos=True),
    "n2_stop": SamplingParams(temperature=0.8, seed=2, n=2, max_tokens=24, stop=[" pink"], ignore_eos=True),
}


@pytest.fixture(scope="module", params=["off", "on", "trees"])
def speculative(gguf_path, request):
    """k fixed; with async scheduling on (as on a GPU), steps for which the n-gram lookup finds no draft overlap;
    "trees": token trees of the continuations of an n-gram's last three occurrences."""
    trees = request.param == "trees"
    return LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024, speculative_method="ngram",
               num_speculative_tokens=6 if trees else 4, speculative_adaptive=False, speculative_branches=3 if trees else 1,
               async_scheduling="off" if trees else request.param)


SPEC_PROMPTS = [LIST, "The quick brown fox jumps over the lazy dog. The quick brown fox"]


@pytest.fixture(scope="module")
def plain_runs(smollm):
    """Each PARAMS entry's outputs without speculation, and the steps they took (shared by both overlap modes)."""
    runs = {}
    for name, params in PARAMS.items():
        before = smollm.engine.stats.steps
        runs[name] = smollm.generate(SPEC_PROMPTS, params), smollm.engine.stats.steps - before
    assert_no_leak(smollm)
    return runs


def test_speculation_never_changes_the_output(plain_runs, speculative):
    """...and correct drafts save steps (greedy on a text that repeats)."""
    core = speculative.engine.core
    overlapped = []  # steps that left theirs in flight
    step = core.step
    core.step = lambda: (deltas := step(), overlapped.append(core._inflight is not None))[0]
    for name, params in PARAMS.items():
        plain, plain_steps = plain_runs[name]
        steps0 = speculative.engine.stats.steps
        spec = speculative.generate(SPEC_PROMPTS, params)
        if name == "greedy":
            assert core.stats.steps - steps0 < plain_steps
        for a, b in zip(plain, spec):
            for x, y in zip(a.outputs, b.outputs):
                assert x.token_ids == y.token_ids, name
                assert x.text == y.text and x.finish_reason == y.finish_reason, name
                if params.logprobs is not None:
                    for la, lb in zip(x.logprobs, y.logprobs):
                        assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la), name
    del core.step
    assert any(overlapped) == core.overlap  # (with overlap, the steps without drafts)
    stats = speculative.engine.core.stats
    assert stats.accepted_draft_tokens > 0 and stats.draft_tokens >= stats.accepted_draft_tokens
    assert_no_leak(speculative)
    assert not speculative.engine.core.proposer._index  # every finished sequence's index is dropped
    assert not speculative.engine.core.proposer._earlier


def _decoy_trees(gguf_path: str) -> LLM:
    """An engine drafting token trees whose first branch is always wrong (a decoy put before the n-gram's tree): every
    draft it keeps is off the first branch and was written past its place in the sequence."""
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024, speculative_method="ngram",
              num_speculative_tokens=6, speculative_adaptive=False, speculative_branches=2)
    propose = llm.engine.core.proposer.propose_tree

    def with_decoy(seq_id, ids, limit):
        tokens, parents = propose(seq_id, ids, limit - 1)
        if not tokens:
            return tokens, parents
        decoy = max(t for t, p in zip(tokens, parents) if p < 0) + 1
        return [decoy] + tokens, [-1] + [p + 1 if p >= 0 else -1 for p in parents]

    llm.engine.core.proposer.propose_tree = with_decoy
    return llm


def test_drafts_off_a_trees_first_branch_are_kept_exactly_and_their_kv_moved(gguf_path, plain_runs, monkeypatch):
    """The output equals plain decoding only if the verdict walks the tree and the next step moves the kept drafts' KV;
    without the moves it changes (the identity check has power)."""
    from slipstream.engine import core as core_module

    for name in ("greedy", "seeded"):
        llm = _decoy_trees(gguf_path)
        got = llm.generate(SPEC_PROMPTS, PARAMS[name])
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain_runs[name][0]], name
        assert llm.engine.core.stats.accepted_draft_tokens > 0
        assert_no_leak(llm)
    monkeypatch.setattr(core_module, "tree_moves", lambda *a: [])
    got = _decoy_trees(gguf_path).generate(SPEC_PROMPTS, PARAMS["greedy"])
    assert [o.outputs[0].token_ids for o in got] != [o.outputs[0].token_ids for o in plain_runs["greedy"][0]]


def test_pages_a_token_tree_wrote_serve_prefix_cache_hits(gguf_path, smollm):
    """A finished sequence's pages, written by tree steps (its last verdict's moves still pending when it ended), are
    cached; a prompt that continues its text reads them, and goes on as plain decoding does."""
    llm = _decoy_trees(gguf_path)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    first = llm.generate([LIST], greedy)[0]
    again = first.prompt_token_ids + first.outputs[0].token_ids[:36]
    got = llm.generate([again], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert got.metrics.num_cached_tokens == 64  # (a page of 64 tokens: the prompt, then 26 tokens of tree steps)
    want = smollm.generate([again], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


# ---- a draft model ----
def _draft_dirs(root):
    """A random Qwen3 target, and two drafts with its 512 token ids: a different, smaller random Llama, and the
    target itself (every greedy draft right)."""
    from transformers import LlamaConfig

    from test_random_arch_equivalence import CONFIGS, make_model_dir

    target, small = root / "target", root / "small"
    make_model_dir(target, CONFIGS["qwen3"])
    make_model_dir(small, LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))
    return str(target), {"small": str(small), "self": str(target)}


DRAFT_PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=30, logprobs=2, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.6, seed=5, repetition_penalty=1.3, presence_penalty=0.3, max_tokens=30,
                                ignore_eos=True),
    "n2_stop": SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=30, stop_token_ids=[7, 9], ignore_eos=True),
}


def test_a_draft_model_never_changes_the_output(tmp_path):
    """Greedy, seeded sampling with logprobs, penalties and n = 2 with stop tokens give exactly the tokens of
    decoding without drafts, whichever draft model proposes them; through chunked prefill (the draft catches up
    over prompts in several steps too), preemption (its KV starts over) and the prefix cache. A draft that is the
    target itself gets every draft accepted, sampled ones too (it draws with the target's seeds and positions), but
    under penalties, which drafts do not apply."""
    target, drafts = _draft_dirs(tmp_path)
    g = __import__("random").Random(0)
    prompts = [[g.randrange(3, 512) for _ in range(n)] for n in (5, 40, 90, 23, 64, 11)]
    prompts.append(prompts[2][:70] + [5, 6, 7])  # shares pages with a prompt before it (prefix cache hits)
    small_pool = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16, num_blocks=24,
                      max_num_batched_tokens=64)
    plain = LLM(target, **small_pool)
    want = {name: plain.generate(prompts, p) for name, p in DRAFT_PARAMS.items()}
    assert plain.engine.core.stats.num_preemptions > 0  # the pool is small enough to preempt
    for label, draft in drafts.items():
        spec = LLM(target, speculative_method="draft", speculative_model=draft, num_speculative_tokens=3,
                   speculative_adaptive=False, **small_pool)
        core = spec.engine.core
        for name, params in DRAFT_PARAMS.items():
            before = (core.stats.steps, core.stats.draft_tokens, core.stats.accepted_draft_tokens)
            got = spec.generate(prompts, params)
            for a, b in zip(want[name], got):
                for x, y in zip(a.outputs, b.outputs):
                    assert x.token_ids == y.token_ids, (label, name)
                    assert x.finish_reason == y.finish_reason and x.stop_reason == y.stop_reason, (label, name)
                    if params.logprobs is not None:
                        for la, lb in zip(x.logprobs, y.logprobs):
                            assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la), (label, name)
            drafted, accepted = core.stats.draft_tokens - before[1], core.stats.accepted_draft_tokens - before[2]
            assert drafted > 0, (label, name)
            if label == "self":  # the target drafting for itself, with the target's noise: every draw agrees
                assert accepted == drafted or (name == "penalties" and accepted > drafted / 2), (name, accepted, drafted)
        assert core.stats.num_preemptions > 0, label
        assert_no_leak(spec)
        assert not core.proposer._valid and not core.proposer._fed  # every finished sequence is forgotten


def test_draft_model_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="speculative_model"):
        EngineConfig.from_options(None, speculative_method="draft")
    with pytest.raises(ValueError, match="speculative_model go together"):
        EngineConfig.from_options(None, speculative_model="x")
    from transformers import LlamaConfig

    from test_random_arch_equivalence import CONFIGS, make_model_dir

    make_model_dir(tmp_path / "target", CONFIGS["qwen3"])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, bos_token_id=1,
                 eos_token_id=2)
    make_model_dir(tmp_path / "wider", LlamaConfig(vocab_size=1024, max_position_embeddings=512, **small))
    make_model_dir(tmp_path / "shorter", LlamaConfig(vocab_size=512, max_position_embeddings=64, **small))
    for draft, message in (("wider", "does not share the target's token ids"), ("shorter", "reaches 64 positions")):
        with pytest.raises(ValueError, match=message):
            LLM(str(tmp_path / "target"), device="cpu", dtype="float32", max_model_len=128, speculative_method="draft",
                speculative_model=str(tmp_path / draft))


def test_the_exactness_check_catches_a_wrong_acceptance_rule(tmp_path, monkeypatch):
    """The identity check above has power: keeping every draft (as a broken verifier would) changes the output at
    once for a draft model that is usually wrong."""
    from slipstream.runner import model_runner

    target, drafts = _draft_dirs(tmp_path)
    prompts = [[5, 9, 33, 70, 101], [400, 3, 3, 17]]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=20, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    want = LLM(target, **kw).generate(prompts, params)
    monkeypatch.setattr(model_runner, "walk_tree", lambda draws, drafts, parents: list(range(len(drafts))))
    got = LLM(target, speculative_method="draft", speculative_model=drafts["small"], speculative_adaptive=False,
              **kw).generate(prompts, params)
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(want, got))


def test_bench_speculative_bounds_the_verification(tmp_path, gguf_path):
    """`slipstream bench speculative` on the quote workload: a drafter that knows the answer gets every draft accepted
    (k + 1 tokens a verifying step), one that is always wrong none; both leave the tokens exactly plain decoding's.
    Each run timed twice (the faster reported): the second run drafts from a script of its own, and its counters
    are the run's alone."""
    from slipstream import cli

    out = tmp_path / "bounds.json"
    cli.main(["bench", "speculative", "--model", gguf_path, "--method", "oracle,wrong", "--num-speculative-tokens", "3",
              "--fixed-k", "--num-prompts", "2", "--batch-sizes", "1,3", "--output-len", "16", "--ignore-eos", "--device", "cpu",
              "--dtype", "float32", "--max-model-len", "1024", "--repeats", "2", "--json", str(out), "--quiet"])
    results = json.loads(out.read_text())["results"]
    # (a batch of 3 over 2 prompts runs, and is labelled, 2 sequences; a batch of 1 runs both prompts, one after the
    # other: whole waves of the batch size)
    assert [(r["method"], r["batch_size"]) for r in results] == [("oracle", 1), ("oracle", 2), ("wrong", 1), ("wrong", 2)]
    for r in results:
        acceptance, length = (1.0, 4.0) if r["method"] == "oracle" else (0.0, 1.0)
        assert r["identical"] == "2/2" and r["output_tokens"] == 16 * 2
        assert r["acceptance"] == acceptance and abs(r["mean_accepted_length"] - length) < 0.35, r
    with pytest.raises(SystemExit):  # a method not known, a k below 1: refused by the parser, before loading
        cli.main(["bench", "speculative", "--method", "oracle,medusa"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "speculative", "--num-speculative-tokens", "2,0"])


def test_draft_policy_follows_the_measured_rates():
    """Per batch size the k with the best measured tokens/s, found by climbing from the most drafts (each step
    measures a neighbour of the best, fewer drafts first); now and then a step tries a neighbour again, within a budget
    of time (test_draft_policy_rations_its_probes); a batch size not measured yet starts from the nearest one's best."""
    from slipstream.engine.speculation import EXPLORE_SHARE, PROBE_EVERY, PROBE_RUN, DraftPolicy

    p = DraftPolicy(4)
    assert p.candidates == [0, 1, 2, 4]
    tried = []
    for _ in range(4):
        k = p.choose(3)
        tried.append(k)
        p.record(3, k, tokens=3 * (1 + k), seconds=1.0 + 2 * k)  # drafts all right, but each costs 2 s: k = 0 wins
    assert tried == [4, 2, 1, 0]
    # batch 3 and 4 share a bucket; each k's single timing is provisional: each is timed again, the fewer drafts first
    # (the plain step as a probe runs it)
    assert [p.choose(4) for _ in range(PROBE_RUN + 3)] == [0] * PROBE_RUN + [1, 2, 4]
    # a probe of k = 1 loses 3 s - 6 tokens / 3 tokens/s = 1 s against the best, which takes 1 / EXPLORE_SHARE steps
    # at the best k (1 s each) to earn
    picks = [p.choose(4) for _ in range(64 * PROBE_EVERY)]
    probes = picks.count(1)
    assert set(picks) == {0, 1} and 0 < probes <= EXPLORE_SHARE * picks.count(0) + 1
    assert p.choose(64) == 0 and DraftPolicy(4).choose(64) == 4  # borrowed from batch 4; a new policy starts high
    for _ in range(30):  # the workload changes: at batch 4, drafts now pay
        p.record(4, 1, tokens=20, seconds=1.0)
    picks = []
    for _ in range(64):
        picks.append(p.choose(4))
        p.record(4, picks[-1], tokens=20 if picks[-1] == 1 else 4, seconds=1.0)
    # the best now, but for the neighbours' timings, stale, retried (a small batch's rates follow its text)
    assert picks.count(1) >= 48, picks


def _policy_rate(step_seconds, step_tokens, steps: int = 3000, batch: int = 14) -> tuple[float, list[int]]:
    """A policy run against a cost model of its steps: (tokens/s over the run, the k of each step)."""
    from slipstream.engine.speculation import DraftPolicy

    p, tokens, seconds, ks = DraftPolicy(4), 0, 0.0, []
    for _ in range(steps):
        k = p.choose(batch)
        p.record(batch, k, step_tokens(k), step_seconds(k))
        tokens, seconds = tokens + step_tokens(k), seconds + step_seconds(k)
        ks.append(k)
    return tokens / seconds, ks


def test_draft_policy_rations_its_probes():
    """Probes of another k lose at most EXPLORE_SHARE of the time against the best k, where a verifying step is dear;
    where one costs nothing against the best, a probe still runs every PROBE_EVERY steps."""
    from slipstream.engine.speculation import EXPLORE_SHARE, PROBE_EVERY

    # the step costs of lease AK's n-gram run at batch 14 (H100, a 135M model): plain steps 2 ms, verifying ones 10 ms
    # for 3.34 tokens a sequence. Fed these, a policy probing every 16 steps ran at 0.85x plain decoding.
    rate, ks = _policy_rate(lambda k: 2e-3 if k == 0 else 10e-3, lambda k: 14 if k == 0 else round(14 * min(1 + k, 3.34)))
    assert rate >= (1 - EXPLORE_SHARE - 0.005) * 14 / 2e-3
    assert ks[-1000:].count(0) >= 990
    # drafts that pay: the policy keeps to the best fixed k, probing the others
    seconds = lambda k: 2e-3 if k == 0 else 2.4e-3 + 0.1e-3 * k  # noqa: E731
    tokens = lambda k: 14 if k == 0 else round(14 * min(1 + 0.88 * k, 4.5))  # noqa: E731
    rate, ks = _policy_rate(seconds, tokens)
    assert rate >= (1 - EXPLORE_SHARE - 0.005) * max(tokens(k) / seconds(k) for k in (0, 1, 2, 4))
    # a neighbour as fast as the best (a tie goes to fewer drafts) costs nothing to probe: every PROBE_EVERY steps
    rate, ks = _policy_rate(lambda k: 1e-3 * (1 + k), lambda k: 14 * (1 + k))
    assert ks[-32 * PROBE_EVERY:].count(1) == 32 and set(ks[-32 * PROBE_EVERY:]) == {0, 1}


def test_a_pause_does_not_keep_the_draft_policy_drafting():
    """Lease AY's costs at batch 256 (H100, the 135M model): plain steps 3.6 ms, verifying ones 15-20 ms for 1.7-2.3
    tokens a sequence, so the plain step is the best; and now and then a pause of the process (100 ms: a full garbage
    collection of an `LLM`'s heap). A pause that fell in a plain step measured by a rare probe kept the policy drafting
    (0.45-0.48x of the best fixed k fed these costs, 0.41-0.50x of plain measured on the GPU); counted at most
    PAUSE_RATIO times the step's average, the plain step stays the best."""
    from slipstream.engine.speculation import DraftPolicy

    cost = {0: 3.6e-3, 1: 15e-3, 2: 17e-3, 4: 20e-3}
    gain = {0: 1.0, 1: 1.7, 2: 2.0, 4: 2.3}
    for every in (150, 300):
        p, tokens, seconds, ks = DraftPolicy(4), 0, 0.0, []
        for i in range(4000):
            k = p.choose(200)
            step = cost[k] + (0.1 if i % every == every - 1 else 0.0)
            p.record(200, k, round(200 * gain[k]), step)
            tokens, seconds = tokens + round(200 * gain[k]), seconds + step
            ks.append(k)
        plain = 4000 * 200 / (4000 * cost[0] + 4000 // every * 0.1)  # plain decoding paused as often
        assert tokens / seconds >= 0.95 * plain, every
        assert ks[-1000:].count(0) >= 950


def test_the_draft_policy_times_plain_steps_as_plain_decoding_runs_them():
    """With overlap a plain step costs plain decoding's 2.5 ms only when launched behind another step; the first after
    a verifying step pays its host work in full (5 ms). Verifying one draft, 7 ms for 1.7 tokens a sequence, beats the
    lone plain step but not a run of them: timed whole, the plain steps a drafting policy probes looked slower than
    drafting and it drafted on (0.81x of plain decoding at batch 256, H100, lease AZ); timed only behind another
    step, the plain step wins."""
    from slipstream.engine.speculation import DraftPolicy

    def cost(k: int, after: int | None) -> float:
        return {1: 7e-3, 2: 9e-3, 4: 12e-3}[k] if k else 2.5e-3 if after == 0 else 5e-3

    gain = {0: 1.0, 1: 1.7, 2: 2.0, 4: 2.2}
    p, tokens, seconds, ks, after = DraftPolicy(4), 0, 0.0, [], None
    for _ in range(4000):
        k = p.choose(256)
        step = cost(k, after)
        p.record(256, k, round(256 * gain[k]), step, steady=after == 0)
        tokens, seconds, after = tokens + round(256 * gain[k]), seconds + step, k
        ks.append(k)
    assert tokens / seconds >= 0.95 * 256 / 2.5e-3
    assert ks[-1000:].count(0) >= 950
    assert sum(p.totals[(256, k)][0] for k in (0, 1, 2, 4)) == 4000  # every step counted, timed or not


def test_the_draft_policy_follows_a_single_sequences_text():
    """At batch 1 the rate of a k follows one sequence's text: quoting its prompt, drafts pay 2-3x; then a line of its
    own, and they lose. Measured over both, the policy sat at k = 0 through most quoting spells (lease BC: 1.55x where
    k = 8 fixed ran 1.99x on the GPU; 0.49 of k = 8 fixed in this model). Stale timings replaced, and the drafts retried
    once the proposer's guesses turn right, it follows the text; where drafts never pay it does not retry them."""
    from slipstream.bench.common import module_from_file
    from slipstream.engine.speculation import STALE_STEPS, DraftPolicy

    sim = module_from_file(os.path.join(os.path.dirname(__file__), "..", "scripts", "draft_policy_sim.py"))  # (its text models, lease BA's step costs)
    for seed in range(2):
        phases = sim.TEXTS["batch 1, quoting and not, a switch every 100 steps"]
        best = max(sim.run_text(phases, seed, k, steps=4000) for k in (0, 1, 2, 4, 8))
        assert sim.run_text(phases, seed, steps=4000) >= 0.8 * best
        never = sim.TEXTS["batch 1, never quoting"]
        assert sim.run_text(never, seed, steps=4000) >= 0.95 * sim.run_text(never, seed, 0, steps=4000)
        # the run's first two steps (k = 16, where a new policy starts) 25 ms longer: timed so, k = 16 was never
        # drafted again (1.37x on the H100 where k = 16 fixed ran 2.4-3.5x); its timing settles once two steps agree
        slow_start = dict(steps=4000, max_k=16, slow_start=2)
        best = max(sim.run_text(phases, seed, k, **slow_start) for k in (0, 4, 8, 16))
        assert sim.run_text(phases, seed, **slow_start) >= 0.75 * best  # (0.54 and 0.73 before, seeds 0 and 1)
    # a retry that falls in steps never timed (a prompt prefilling beside the one decoding sequence) is not repeated
    # step after step: each such step would read the step in flight before launching
    p = DraftPolicy(4)
    for k in (4, 2, 1, 0, 0, 0):
        p.record(1, k, tokens=1, seconds=1e-3 if k else 0.5e-3)
    p.record_guesses(1, 10, 10)
    picks = [p.choose(1) for _ in range(64)]
    # (one more: k = 1's single timing is confirmed once, as a first timing is)
    assert 0 < picks.count(1) <= 64 // STALE_STEPS + 1, picks


def test_draft_policy_measures_the_plain_step_where_the_climb_stops():
    """Drafts never accepted, but a noisy timing made k = 2 look faster than k = 1 (on a busy CI machine: the climb
    then stopped at 2, its two neighbours measured, and speculation never switched off): the plain step is measured
    next, and wins."""
    from slipstream.engine.speculation import DraftPolicy

    p = DraftPolicy(8)
    seconds = {8: 0.9, 4: 0.7, 2: 0.5, 1: 0.6, 0: 0.3}
    tried = []
    for _ in range(5):
        k = p.choose(8)
        tried.append(k)
        p.record(8, k, tokens=8, seconds=seconds[k])
    assert tried == [8, 4, 2, 1, 0] and p.choose(8) == 0


def test_a_draft_policy_timing_settles_when_two_steps_agree():
    """A k's first timing that a one-off cost inflated (25 ms where its steps take 1 ms) is timed again at once and the
    newer step stands; the plain step, timed again, runs as a probe does (PROBE_RUN steps, the first after a
    verifying step not timed), so that its second timing is taken."""
    from slipstream.engine.speculation import PROBE_RUN, DraftPolicy

    p, ks, after = DraftPolicy(4), [], None
    for i in range(40):
        k = p.choose(1)
        seconds = (25e-3 if i == 0 else 1e-3) if k else 0.6e-3  # drafts: 1 + k tokens a step (at most 4); plain: 1
        p.record(1, k, 1 + min(k, 3), seconds, steady=after == 0)
        ks.append(k)
        after = k
    assert ks[0] == 4 and 4 in ks[1:16], ks  # the first k = 4 step (25 ms) is timed again among the first
    assert ks[-16:].count(4) >= 12, ks  # (a probe of a neighbour now and then)
    # the plain step next to the best, timed once: timed again in a probe's run of plain steps
    p = DraftPolicy(1)
    p.record(1, 1, 2, 1e-3)
    p.record(1, 1, 2, 1e-3)
    p.record(1, 0, 1, 0.6e-3, steady=True)
    assert [p.choose(1) for _ in range(PROBE_RUN)] == [0] * PROBE_RUN
    # a step timed short (with overlap, read at once after a pause) does not stand: the next timing replaces it
    p = DraftPolicy(1)
    p.record(1, 1, 2, 1e-3)
    p.record(1, 1, 2, 0.01e-3)
    p.record(1, 1, 2, 1e-3)
    assert p.rate[(1, 1)] == pytest.approx(2 / 1e-3)
    # two slow steps in a row after a good one (a one-off cost spanning them) agree with each other, not with the
    # shortest: they do not settle the plain step at batch 256, whose rate the next timing gives back (a review's case:
    # settled slow, the policy ran 4 plain steps of 3,000 where plain decoding was best)
    p = DraftPolicy(4)
    for seconds in (3.6e-3, 103.6e-3, 103.6e-3, 3.6e-3):
        p.record(256, 0, 256, seconds, steady=True)
    assert p.rate[(256, 0)] == pytest.approx(256 / 3.6e-3)


def test_draft_policy_ties_go_to_fewer_drafts():
    """Equal measured rates (drafts that are never accepted, steps whose cost does not grow with k): the cheaper step."""
    from slipstream.engine.speculation import DraftPolicy

    p = DraftPolicy(4)
    for k in (4, 2, 1, 0):  # measured from the most drafts down, as the climb does
        p.record(8, k, tokens=8, seconds=0.5)
    assert p.choose(8) == 0


STORIES = [f"Write a story about dragon number {i}." for i in range(8)]
STORY_PARAMS = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
STORY_ENGINE = dict(dtype="float32", device="cpu", max_model_len=512)


@pytest.fixture(scope="module")
def story_answers(gguf_path):
    """Each story's prompt and greedy answer without speculation, as token ids."""
    out = LLM(gguf_path, **STORY_ENGINE).generate(STORIES, STORY_PARAMS)
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in out]


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_speculation_turns_itself_off_where_it_does_not_pay(gguf_path, story_answers, async_scheduling):
    """Eight sequences verifying 8 drafts each compute 72 tokens a step instead of 8, which costs on a CPU: with a
    drafter that is always wrong the adaptive policy soon drafts little (fixed, every step would verify 8 a
    sequence); with one that is always right it keeps drafting and the answers take a fraction of the steps."""
    from slipstream.bench.spec_bench import ScriptedProposer

    for wrong in (True, False):
        llm = LLM(gguf_path, speculative_method="ngram", num_speculative_tokens=8, async_scheduling=async_scheduling,
                  **STORY_ENGINE)
        core = llm.engine.core
        core.proposer = ScriptedProposer(story_answers, wrong)
        got = llm.generate(STORIES, STORY_PARAMS)
        assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in got] == story_answers
        st = core.stats
        mean_k = st.draft_tokens / (st.decode_steps * len(STORIES))
        if wrong:
            # (fixed, it would be 8; the bound leaves room for steps timed slow while the suite's other processes
            # have the cores: one CI run measured 2.54 and failed a bound of 2.5)
            assert mean_k < 4 and st.accepted_draft_tokens == 0, (mean_k, core.draft_policy.rate)
            # steps without drafts were measured (with overlap, when they are read: a step later)
            assert core.draft_policy.rate.get((8, 0), 0) > 0, core.draft_policy.rate
        else:
            assert st.accepted_draft_tokens == st.draft_tokens and st.decode_steps < 25, (st.decode_steps, core.draft_policy.rate)


def test_a_plain_step_asks_the_proposer_nothing(gguf_path):
    """Where the draft policy chooses no drafts the step is plain: the proposer is not asked (a pass over every
    sequence was 4% of a run at batch 256, H100), and drafts a sequence still holds from an earlier step are not
    verified; once the policy drafts again, they are proposed afresh."""
    llm = LLM(gguf_path, speculative_method="ngram", num_speculative_tokens=4, **STORY_ENGINE)
    core = llm.engine.core
    asked = []
    propose = core.proposer.propose
    core.proposer.propose = lambda *args: asked.append(args[0]) or propose(*args)
    core.draft_policy.choose = lambda batch: 0
    core.add_request("r", llm.tokenizer.encode(STORIES[0]), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(3):
        core.step()
    (seq,) = core.scheduler.running
    seq.draft_token_ids = [11, 12, 13]  # left over: a step that drafted gave this sequence none
    while core.has_unfinished():
        core.step()
    assert asked == [] and core.stats.draft_tokens == 0 and core.stats.drafts == 0
    assert 0 <= core.draft_policy._guessed[1] <= 1  # (what drafting would have yielded: the index's first guesses)
    core.draft_policy.choose = lambda batch: 4
    core.add_request("s", llm.tokenizer.encode(STORIES[1]), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    while core.has_unfinished():
        core.step()
    assert asked  # (each step that may draft asks for every decoding sequence's)


def test_plain_steps_are_timed_as_plain_decoding_runs_them(gguf_path):
    """With overlap, a plain step launched right after a verifying one that is read before it is scheduled (min_tokens
    still bans the end) starts with nothing in flight: not timed; the next, behind it, is. Otherwise drafts are planned
    behind (every plain step launched behind another: all timed); with a penalty every step is read before the next,
    as in plain decoding with that penalty: all are timed (counting none of them, the policy measured no plain step
    and kept returning to it)."""
    from slipstream.bench.spec_bench import ScriptedProposer

    for params in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                   SamplingParams(temperature=0, min_tokens=39, max_tokens=40),
                   SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.05)):
        answers = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                   for o in LLM(gguf_path, **STORY_ENGINE).generate(STORIES[:1], params)]
        llm = LLM(gguf_path, speculative_method="ngram", num_speculative_tokens=4, async_scheduling="on", **STORY_ENGINE)
        core = llm.engine.core
        core.proposer = ScriptedProposer(answers, False)  # drafts every step that asks
        ks = iter([4, 0, 0, 0] * 100)
        core.draft_policy.choose = lambda batch: next(ks)
        timed = []
        record = core.draft_policy.record
        core.draft_policy.record = lambda batch, k, tokens, seconds, steady: (timed.append((k, steady)),
                                                                              record(batch, k, tokens, seconds, steady))
        llm.generate(STORIES[:1], params)
        after = [steady for k, steady in timed[[k for k, _ in timed].index(4):] if k == 0]
        if params.min_tokens:  # three plain steps after each verifying one: the first launched alone
            assert after[:6] == [False, True, True, False, True, True], timed
        else:
            assert after and all(after), timed
        assert (1, 0) in core.draft_policy.rate


def test_drafts_are_verified_behind_the_step_in_flight(gguf_path, story_answers):
    """With overlap, the step after a verifying one is launched before that one is read, planned as if every draft were
    accepted, and the device moves it back by the rejected ones (its positions, and for a seeded draw its output
    index); it drafts too where the sequence's last verdict kept every draft. Steps of 4, 4 and no drafts in turn, with
    drafts always right, always wrong, and right for a while then wrong (every count of rejected drafts) give
    plain decoding's answers, greedy and seeded; with drafts always right, every step after a verifying one is launched
    behind it."""
    from slipstream.bench.spec_bench import ScriptedProposer

    class Partly(ScriptedProposer):  # the third token it looks up is wrong
        def propose(self, seq_id, ids, limit, known=None):  # noqa: ANN001, ANN201
            got = super().propose(seq_id, ids, limit, known)
            return got[:2] + [t + 1 for t in got[2:3]] + got[3:]

    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=60, ignore_eos=True)
    seeded_answers = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                      for o in LLM(gguf_path, **STORY_ENGINE).generate(STORIES[:2], seeded)]
    llm = LLM(gguf_path, speculative_method="ngram", num_speculative_tokens=4, async_scheduling="on", **STORY_ENGINE)
    core = llm.engine.core
    behind = []  # per step launched: a step verifying drafts was in flight
    launch = core._launch
    core._launch = lambda batch, *a: (behind.append(core._inflight is not None and bool(core._inflight.drafts)),
                                      launch(batch, *a))[1]
    for params, answers in ((STORY_PARAMS, story_answers[:2]), (seeded, seeded_answers)):
        for proposer in (ScriptedProposer(answers, False), ScriptedProposer(answers, True), Partly(answers, False)):
            core.proposer = proposer
            ks = iter([4, 4, 0] * 100)
            core.draft_policy.choose = lambda batch: next(ks)
            behind.clear()
            core.stats.draft_tokens = core.stats.accepted_draft_tokens = 0
            got = llm.generate(STORIES[:2], params)
            assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in got] == answers
            st = core.stats
            assert sum(behind) >= 5
            if proposer.wrong:
                assert st.accepted_draft_tokens == 0
            elif isinstance(proposer, Partly):
                assert 0 < st.accepted_draft_tokens < st.draft_tokens
            else:
                # (the second of two verifying steps and the plain one after them: two steps in three)
                assert st.accepted_draft_tokens == st.draft_tokens > 0 and sum(behind) >= 2 * len(behind) / 3 - 3
    assert_no_leak(llm)


def test_a_verifying_step_is_read_by_the_next_step(gguf_path):
    """With overlap, a step that verifies drafts where min_tokens still bans the end (which the next step's plan must
    know) is read at the start of the next step(), before anything is scheduled after it, not at the end of its own:
    what the caller does with the deltas in between runs while it computes. The answers stay plain decoding's."""
    from slipstream.bench.spec_bench import ScriptedProposer

    params = SamplingParams(temperature=0, min_tokens=59, max_tokens=60)
    answers = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
               for o in LLM(gguf_path, **STORY_ENGINE).generate(STORIES[:2], params)]
    llm = LLM(gguf_path, speculative_method="ngram", num_speculative_tokens=4, speculative_adaptive=False,
              async_scheduling="on", **STORY_ENGINE)
    core = llm.engine.core
    core.proposer = ScriptedProposer(answers, False)
    left, unread = [], []
    step, schedule = core.step, core.scheduler.schedule
    core.step = lambda: (deltas := step(), left.append(core._inflight is not None and core._inflight.sync))[0]
    # (nothing is scheduled while a step that must be read first is in flight)
    core.scheduler.schedule = lambda *a, **kw: (unread.append(core._inflight is not None and core._inflight.sync),
                                                schedule(*a, **kw))[1]
    got = llm.generate(STORIES[:2], params)
    assert not any(unread)
    assert [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in got] == answers
    assert sum(left) >= 5 and core.stats.accepted_draft_tokens == core.stats.draft_tokens > 0


def test_speculative_config_takes_vllms_json():
    c = EngineConfig.from_options(None, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert (c.speculative_method, c.num_speculative_tokens, c.speculative_adaptive) == ("ngram", 3, True)
    c = EngineConfig.from_options(None, speculative_config={"method": "draft_model", "model": "d", "adaptive": False})
    assert (c.speculative_method, c.speculative_model, c.speculative_adaptive) == ("draft", "d", False)
    for bad, message in (("{", "not valid JSON"), ('{"method": "medusa"}', "speculative_config.method"),
                         ('{"method": "ngram", "prompt_lookup_max": 5}', "unknown"), ("[1]", "JSON object")):
        with pytest.raises(ValueError, match=message):
            EngineConfig.from_options(None, speculative_config=bad)
    with pytest.raises(ValueError, match="given both"):
        EngineConfig.from_options(None, num_speculative_tokens=5, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
