"""Property tests of the block manager, scheduler and radix cache over random arrivals, finishes, aborts and
preemptions, without a model: 'compute' just advances counters and appends random tokens."""
import random

import pytest

from slipstream.config import SchedulerConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.radix_cache import RadixCache
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Request, Sequence
from slipstream.sampling_params import SamplingParams


def check_invariants(sched: Scheduler, bm: BlockManager, all_seqs: list[Sequence]) -> None:
    bm.check_consistency()
    holders = [0] * bm.num_blocks
    for s in all_seqs:
        if not s.is_finished:
            for b in s.block_table:
                holders[b] += 1
    cache = sched.prefix_cache
    if cache is not None:
        for b in cache.nodes:
            holders[b] += 1
        assert cache.num_evictable_blocks == sum(1 for b in cache.nodes if bm.ref_counts[b] == 1)
        for node in cache.nodes.values():  # what the count calls evictable can be evicted: leaves go first, and a
            # page is never less referenced than the pages cached below it
            parent = node.parent
            assert parent is cache.root or bm.ref_counts[parent.block] >= bm.ref_counts[node.block], (
                f"page {node.block} (refs {bm.ref_counts[node.block]}) is cached below page {parent.block} "
                f"(refs {bm.ref_counts[parent.block]})")
    assert holders == bm.ref_counts, "reference counts disagree with block tables + cached pages"
    for s in sched.waiting:
        assert not s.block_table and s.num_computed_tokens == 0, "a waiting sequence holds pages"
    for s in sched.running:
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_workload(seed, prefix_caching):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    max_len = 96
    bm = BlockManager(num_blocks=-(-max_len // bs) + rng.randint(0, 40), block_size=bs)
    cfg = SchedulerConfig(max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 64), max_model_len=max_len,
                          max_wait_steps=rng.randint(1, 20))
    sched = Scheduler(cfg, bm, RadixCache(bm) if prefix_caching else None)
    shared = [rng.randrange(50) for _ in range(40)]  # a common prefix so the cache gets hits
    all_seqs: list[Sequence] = []
    reqs: list[Request] = []
    preemptions = 0
    for step in range(5000):
        if step < 150 and rng.random() < 0.4:
            n_prompt = rng.randint(1, 60)
            prompt = (shared[: rng.randint(0, 40)] + [rng.randrange(50) for _ in range(n_prompt)])[:n_prompt]
            # (prompt_logprobs: the prompt is scored, so computed without the cache even where its pages are cached)
            req = Request(f"r{len(reqs)}", prompt, SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randint(1, max_len - n_prompt),
                                                                  prompt_logprobs=rng.choice([None, None, None, 1])))
            for i in range(req.params.n):
                seq = Sequence(len(all_seqs), req, i, list(prompt), seed=i)
                req.seqs.append(seq)
                all_seqs.append(seq)
                sched.add(seq)
            reqs.append(req)
        batch = sched.schedule()
        preemptions += batch.num_preempted
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert n >= 1 and seq.num_computed_tokens + n <= seq.num_tokens
            assert len(seq.block_table) * bs >= seq.num_computed_tokens + n
        check_invariants(sched, bm, all_seqs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if sched.prefix_cache is not None and seq.num_computed_tokens <= seq.num_prompt_tokens:
                sched.prefix_cache.insert(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(rng.randrange(50))
                if seq.num_output_tokens >= seq.params.max_tokens or rng.random() < 0.02:
                    sched.finish(seq)
        if rng.random() < 0.05:  # a client goes away
            live = [s for s in all_seqs if not s.is_finished]
            if live:
                sched.finish(rng.choice(live))
        check_invariants(sched, bm, all_seqs)
        if step >= 150 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "work left after the arrivals stopped: a request starved or deadlocked"
    if sched.prefix_cache is not None:
        sched.prefix_cache.clear()
    assert bm.num_used_blocks == 0
    bm.check_consistency()


def test_cache_evicts_lru_leaves_only_when_needed():
    bm = BlockManager(num_blocks=6, block_size=2)
    cache = RadixCache(bm)
    req = Request("a", [1, 2, 3, 4, 5], SamplingParams())
    a = Sequence(0, req, 0, [1, 2, 3, 4, 5], 0)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    cache.insert(a)  # caches pages for [1,2] and [3,4]
    bm.free(a)
    assert len(cache.nodes) == 2 and cache.num_evictable_blocks == 2 and bm.num_free_blocks == 6
    b = Sequence(1, Request("b", [1, 2, 3, 4, 9], SamplingParams()), 0, [1, 2, 3, 4, 9], 0)
    cache.match(b)
    assert b.num_computed_tokens == 4 and cache.num_evictable_blocks == 0  # locked while b uses them
    c = Sequence(2, Request("c", [7] * 9, SamplingParams()), 0, [7] * 9, 0)
    assert not bm.can_allocate(c, 9)  # 5 pages needed, 4 free, the cached ones are locked
    bm.free(b)
    assert bm.can_allocate(c, 9)
    assert cache.evict(bm.blocks_needed(c, 9) - bm.num_unused_blocks) == 1  # what the scheduler does when short
    bm.allocate(c, 9)  # the leaf [3,4] went first, its parent stays
    assert len(cache.nodes) == 1 and cache.stats.evicted_blocks == 1
    full = Sequence(3, Request("d", [1, 2], SamplingParams()), 0, [1, 2], 0)
    cache.match(full)
    assert full.num_computed_tokens == 0  # a full-prompt hit still leaves the last token to compute


def test_a_draft_heads_cache_also_matches_the_token_after_each_page():
    """With a draft head a page's KV depends on the token after it (radix_cache.py): a page serves only sequences
    that continue it with the same token as the sequence that computed it; a plain cache shares it regardless."""
    hits = {}
    for head in (False, True):
        bm = BlockManager(num_blocks=8, block_size=2)
        cache = RadixCache(bm, next_token_in_kv=head)
        a = Sequence(0, Request("a", [1, 2, 3, 4, 5], SamplingParams()), 0, [1, 2, 3, 4, 5], 0)
        bm.allocate(a, 5)
        a.num_computed_tokens = 5
        cache.insert(a)  # pages [1,2] (then 3) and [3,4] (then 5)
        bm.free(a)
        hits[head] = []
        for i, tokens in enumerate(([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9], [1, 2, 7, 8, 9])):
            seq = Sequence(i + 1, Request(f"s{i}", tokens, SamplingParams()), 0, list(tokens), 0)
            cache.match(seq)
            hits[head].append(seq.num_computed_tokens)
            bm.free(seq)
    assert hits == {False: [4, 4, 2], True: [4, 2, 0]}
    # a prompt that ends on a page boundary: its last page's next token is drawn later, and told at the next insert
    bm = BlockManager(num_blocks=8, block_size=2)
    cache = RadixCache(bm, next_token_in_kv=True)
    a = Sequence(0, Request("a", [1, 2, 3, 4], SamplingParams()), 0, [1, 2, 3, 4], 0)
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    cache.insert(a)

    def hit(tokens):
        seq = Sequence(9, Request("q", tokens, SamplingParams()), 0, list(tokens), 0)
        cache.match(seq)
        bm.free(seq)
        return seq.num_computed_tokens

    assert hit([1, 2, 3, 4, 5, 6]) == 2
    a.token_ids.append(5)
    cache.insert(a)
    assert (hit([1, 2, 3, 4, 5, 6]), hit([1, 2, 3, 4, 6, 6])) == (4, 2)

    def run(seq_id, tokens):  # a sequence that matches, computes the rest but its last token, and is cached
        seq = Sequence(seq_id, Request(f"r{seq_id}", tokens, SamplingParams()), 0, list(tokens), 0)
        cache.match(seq)
        bm.allocate(seq, len(tokens) - 1)
        seq.num_computed_tokens = len(tokens) - 1
        cache.insert(seq)
        bm.free(seq)

    # a branch right after a page is a branch of the tree: each continuation's deeper pages are found again
    run(10, [1, 2, 3, 4, 9, 9, 7])
    assert (hit([1, 2, 3, 4, 9, 9, 7, 8]), hit([1, 2, 3, 4, 5, 6])) == (6, 4)
    # a prompt ending on a page whose owner is preempted before drawing its next token: the page cannot serve, but
    # the owner's recomputed one does, and the stale one is an unreferenced leaf (evictable)
    c = Sequence(20, Request("c", [1, 2, 7, 7], SamplingParams()), 0, [1, 2, 7, 7], 0)
    cache.match(c)
    bm.allocate(c, 4)
    c.num_computed_tokens = 4
    cache.insert(c)
    bm.free(c)  # preempted
    run(21, [1, 2, 7, 7, 8, 8, 8])
    assert hit([1, 2, 7, 7, 8, 8, 8, 1]) == 6
    bm.free(a)
    evictable = cache.num_evictable_blocks
    assert cache.clear() == evictable and not cache.nodes
    bm.check_consistency()


@pytest.mark.parametrize("seed", range(5))
def test_radix_cache_against_a_reference_model(seed):
    """Random insert / match (lock) / release (unlock) / evict against a model that keeps the set of cached
    page paths: matches agree, eviction takes only unlocked leaves, least recently used first."""
    rng = random.Random(seed)
    bs = 2
    bm = BlockManager(num_blocks=40, block_size=bs)
    cache = RadixCache(bm)
    cached: dict[tuple, int] = {}  # path of page keys -> block   (the reference model)
    live: list[Sequence] = []

    def paths(tokens):
        pages = [tuple(tokens[i * bs : (i + 1) * bs]) for i in range(len(tokens) // bs)]
        return [tuple(pages[: i + 1]) for i in range(len(pages))]

    for step in range(300):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        seq = Sequence(step, Request(f"r{step}", tokens, SamplingParams()), 0, list(tokens), 0)
        if op < 0.5 and bm.can_allocate(seq, len(tokens)):  # a request: match, compute the rest, cache it
            expect = 0
            for p in paths(tokens[:-1]):
                if p not in cached:
                    break
                expect += bs
            cache.match(seq)
            assert seq.num_computed_tokens == expect
            locked = {b for s in live + [seq] for b in s.block_table}
            before = dict(cached)
            short = bm.blocks_needed(seq, len(tokens)) - bm.num_unused_blocks
            if short > 0:
                cache.evict(short)  # under pressure, as the scheduler does
            bm.allocate(seq, len(tokens))
            for p in [p for p in before if before[p] not in cache.nodes]:
                assert before[p] not in locked, "evicted a locked page"
                del cached[p]
            seq.num_computed_tokens = len(tokens)
            cache.insert(seq)
            for p, block in zip(paths(tokens), seq.block_table):
                cached.setdefault(p, block)
            live.append(seq)
        elif op < 0.8 and live:  # a request finishes: its pages stay cached but unlocked
            bm.free(live.pop(rng.randrange(len(live))))
        else:  # allocator pressure
            locked = {b for s in live for b in s.block_table}
            before = dict(cached)
            evictable_leaves = [p for p, b in before.items() if b not in locked and not any(q[:-1] == p for q in before)]
            access = {b: n.last_access for b, n in cache.nodes.items()}
            freed = cache.evict(rng.randint(1, 4))
            gone = {p for p in before if before[p] not in cache.nodes}
            left = [b for b, n in cache.nodes.items() if not n.children and bm.ref_counts[b] == 1]
            if gone and left:  # least recently used first
                assert max(access[before[p]] for p in gone) <= min(access[b] for b in left)
            for p in gone:
                del cached[p]
            assert len(gone) == freed
            assert all(before[p] not in locked for p in gone), "evicted a locked page"
            assert not evictable_leaves or freed >= 1
        assert set(cached.values()) == set(cache.nodes), "cache and model disagree on what is cached"
        assert cache.num_evictable_blocks == sum(1 for b in cache.nodes if bm.ref_counts[b] == 1)
        for node in cache.nodes.values():  # what the count calls evictable can be evicted: leaves go first, and a
            # page is never less referenced than the pages cached below it
            parent = node.parent
            assert parent is cache.root or bm.ref_counts[parent.block] >= bm.ref_counts[node.block], (
                f"page {node.block} (refs {bm.ref_counts[node.block]}) is cached below page {parent.block} "
                f"(refs {bm.ref_counts[parent.block]})")
        bm.check_consistency()
    for s in live:
        bm.free(s)
    cache.clear()
    assert bm.num_used_blocks == 0
