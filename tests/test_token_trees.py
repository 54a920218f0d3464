"""Token trees: drafts verified as a tree in one step (several drafts may follow the same token).

Host side: the verdict's walk against a brute-force search, the ancestor masks, the n-gram proposer's trees against
the continuations they merge. Runner level: a tree step gives every draft the logits of its own root-to-draft chain,
and the accepted drafts' KV, moved by the next step, is the KV that chain writes. The engine's outputs with trees
equal plain decoding's in tests/test_speculative.py (the `speculative` fixture's "trees" engine).
"""
import random

import pytest
import torch

from slipstream import SamplingParams
from slipstream.config import EngineConfig
from slipstream.engine.core import tree_moves
from slipstream.engine.proposer import NgramProposer
from slipstream.runner.batch import SamplingRow, SeqStep, Step, tree_depths, tree_path, walk_tree
from slipstream.runner.inputs import ancestor_masks
from slipstream.runner.model_runner import ModelRunner
from test_multi_token import BS, TINY, _logits_by_seq


def _random_tree(rng: random.Random, n: int, vocab: int) -> tuple[list[int], list[int]]:
    """n drafts: each a child of an earlier one (or of the root), siblings with different tokens (as a trie's)."""
    parents, tokens, used = [], [], {}
    for i in range(n):
        p = rng.randint(-1, i - 1)
        free = [t for t in range(vocab) if t not in used.get(p, set())]
        if not free:
            p, free = i - 1, list(range(vocab))  # (a new leaf's children are all free)
        t = rng.choice(free)
        used.setdefault(p, set()).add(t)
        parents.append(p)
        tokens.append(t)
    return tokens, parents


def test_the_walk_keeps_the_deepest_draft_whose_path_the_draws_follow():
    rng = random.Random(0)
    for trial in range(300):
        n, vocab = rng.randint(0, 9), rng.randint(1, 4)
        drafts, parents = _random_tree(rng, n, vocab)
        draws = [rng.randrange(vocab) for _ in range(n + 1)]
        # brute force: a draft is kept when each draft on its path equals the draw after its parent
        kept = [i for i in range(n) if all(drafts[j] == draws[parents[j] + 1] for j in tree_path(parents, i))]
        want = tree_path(parents, max(kept, key=lambda i: tree_depths(parents)[i])) if kept else []
        assert walk_tree(draws, drafts, parents) == want, (trial, drafts, parents, draws)
        # a chain as a tree walks as the chain does
        chain = list(range(-1, n - 1))
        assert walk_tree(draws, drafts, chain) == walk_tree(draws, drafts, None)


def test_tree_shapes_by_hand():
    parents = [-1, 0, 0, -1, 3, 1]  # 0 -> (1 -> 5, 2); 3 -> 4
    assert tree_depths(parents) == [1, 2, 2, 1, 2, 3]
    assert tree_path(parents, 5) == [0, 1, 5] and tree_path(parents, 4) == [3, 4]
    # one real token (row 0), then the drafts at rows 1..6: each sees row 0, its ancestors and itself
    masks = ancestor_masks(1, parents)
    assert [[j for j in range(7) if m >> j & 1] for m in masks] == [
        [0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 4], [0, 4, 5], [0, 1, 2, 6]]
    assert ancestor_masks(2, [-1, 0]) == [0b1, 0b11, 0b111, 0b1111]  # a chain is causal
    # draft i was written at last + 1 + i and goes to last + its depth; the first of a chain's stays
    table, last = [7, 3], 14  # positions 0..15 in page 7, 16.. in page 3 (pages of 16)
    slot = lambda p: table[p // 16] * 16 + p % 16  # noqa: E731
    assert tree_moves(table, 16, last, [0, 1, 5]) == [(slot(20), slot(17))]
    assert tree_moves(table, 16, last, [3, 4]) == [(slot(18), slot(15)), (slot(19), slot(16))]


def _continuations(ids: list[int], n: int, branches: int, limit: int) -> list[list[int]]:
    """The tokens after the last `branches` earlier occurrences of ids' last n tokens, latest first."""
    tail, out = ids[len(ids) - n :], []
    for end in range(len(ids) - 1, n - 1, -1):
        if ids[end - n : end] == tail and len(out) < branches:
            out.append(ids[end : end + limit])
    return out


def test_ngram_trees_merge_the_continuations_of_the_last_occurrences():
    prop = NgramProposer(branches=3)
    ids = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2]
    tokens, parents = prop.propose_tree(0, ids, 10)
    # "1 2" was followed by 3 7 1 2 (the latest: weight 1), 5 6 1 2 3 (1/2), 3 4 1 2 5 (1/4); a draft scores the
    # weights through it times 0.8 a level: 3 (0.8 + 0.2), 3 7 (0.64), 3 7 1 (0.51), 3 7 1 2 (0.41), 5 (0.4), 5 6, ...
    paths = [[tokens[j] for j in tree_path(parents, i)] for i in range(len(tokens))]
    assert paths == [[3], [3, 7], [3, 7, 1], [3, 7, 1, 2], [5], [5, 6], [5, 6, 1], [5, 6, 1, 2], [5, 6, 1, 2, 3], [3, 4]]
    assert parents == [-1, 0, 1, 2, -1, 4, 5, 6, 7, 0]
    rng = random.Random(1)
    for trial in range(60):
        branches, limit = rng.randint(1, 4), rng.randint(1, 8)
        prop = NgramProposer(min_n=rng.randint(1, 2), max_n=rng.randint(2, 3), branches=branches)
        ids = [rng.randrange(3) for _ in range(rng.randint(1, 8))]
        for _ in range(15):
            tokens, parents = prop.propose_tree(5, ids, limit)
            chain = NgramProposer(prop.min_n, prop.max_n).propose(5, ids, limit)
            assert len(tokens) <= limit and all(p < i for i, p in enumerate(parents))
            if not chain:
                assert tokens == []
            else:  # the longest n-gram that occurred before: its continuations, and nothing else, in the tree
                n = next(n for n in range(min(prop.max_n, len(ids)), prop.min_n - 1, -1)
                         if _continuations(ids, n, 1, limit) == [chain])
                conts = _continuations(ids, n, branches, limit)
                paths = {tuple(tokens[j] for j in tree_path(parents, i)) for i in range(len(tokens))}
                assert all(any(list(p) == c[: len(p)] for c in conts) for p in paths), (trial, ids)
                assert len(paths) == len(tokens)  # siblings differ
                # the latest continuation's head is kept first
                assert [tokens[i] for i in range(len(tokens)) if parents[i] == i - 1][:2] == chain[:2] or branches > 1
                assert tokens[0] == chain[0]
            ids += [rng.randrange(3) for _ in range(rng.randint(1, 3))]
    prop.forget(5)
    assert 5 not in prop._index and 5 not in prop._earlier


def test_ngram_trees_branch_sooner_where_fewer_drafts_are_kept():
    """The discount a level follows the verdicts: where every tree's path is kept to its depth, the latest
    continuation's chain fills the tree; where drafts are seldom kept, the other continuations' heads come first."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 10, 11, 12, 13, 14, 15, 16, 1, 2]  # "1 2": then 10 11 ..., or 3 4 ...
    for kept in (True, False):
        prop = NgramProposer(branches=2)
        for _ in range(200):
            tokens, parents = prop.propose_tree(0, ids, 8)
            prop.accepted(0, max(tree_depths(parents)) if kept else 0)
        tokens, parents = prop.propose_tree(0, ids, 8)
        if kept:
            assert tokens == [10, 11, 12, 13, 14, 15, 16, 1] and parents == list(range(-1, 7))
        else:
            assert tokens[:4] == [10, 3, 11, 4] and parents[:4] == [-1, -1, 0, 1]


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_a_tree_step_gives_each_draft_its_chains_logits_and_moves_its_kv(kv):
    """Every row of a tree step scores what plain decoding scores after that draft's path; once the verdict's moves
    ran, the sequence's pool holds the path's KV where a chain of those tokens writes it, and decodes on alike."""
    config = EngineConfig.from_options(None, device="cpu", dtype="float32", block_size=BS, num_blocks=64,
                                       max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
                                       kv_cache_dtype=kv, speculative_method="ngram", speculative_branches=2)
    runner = ModelRunner(config, TINY, None, 256, {2})
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 256, (29,), generator=g).tolist()  # the tree crosses from page 1 into page 2
    x = 77  # the token the tree follows
    drafts, parents = [11, 12, 13, 14, 15, 16], [-1, 0, 0, -1, 3, 1]
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)
    pages = iter(range(64))

    def new_seq(seq_id: int) -> list[int]:
        table = [next(pages) for _ in range(4)]
        runner.compute_logits(Step([SeqStep(seq_id, prompt, 0, table, 0, None)]))
        return table

    tree_table = new_seq(0)
    got = _logits_by_seq(runner, Step([SeqStep(0, [x] + drafts, len(prompt), tree_table, len(drafts), row,
                                                draft_parents=parents)]))[0]
    for i in range(-1, len(drafts)):  # the root's row, then each draft's: against its chain, a sequence of its own
        path = [drafts[j] for j in tree_path(parents, i)] if i >= 0 else []
        table = new_seq(10 + i)
        want = _logits_by_seq(runner, Step([SeqStep(10 + i, [x] + path, len(prompt), table, len(path), row)]))[10 + i]
        torch.testing.assert_close(got[i + 1], want[-1], atol=2e-4, rtol=1e-4)
    # the verdict keeps drafts 0, 1, 5 (x, 11, 12, 16 at positions 29..32); the next step moves them and decodes 5
    path = [0, 1, 5]
    moves = tree_moves(tree_table, BS, len(prompt), path)
    after = _logits_by_seq(runner, Step([SeqStep(0, [5], len(prompt) + 4, tree_table, 0, row)], moves))[0]
    chain_table = new_seq(20)
    want = _logits_by_seq(runner, Step([SeqStep(20, [x, 11, 12, 16, 5], len(prompt), chain_table, 0, row)]))[20]
    torch.testing.assert_close(after[0], want[0], atol=2e-4, rtol=1e-4)
    slot = lambda t, p: t[p // BS] * BS + p % BS  # noqa: E731
    for layer in range(TINY.num_layers):
        for cache in (*runner.backend.kv_cache(layer), *(runner.backend.kv_scales(layer) or ())):
            flat = cache.view(-1, *cache.shape[2:])
            if flat.dtype == torch.float8_e4m3fn:
                flat = flat.view(torch.uint8)
            a = flat[[slot(tree_table, p) for p in range(len(prompt) + 5)]].float()
            b = flat[[slot(chain_table, p) for p in range(len(prompt) + 5)]].float()
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)  # (FP8 codes: exactly)


def test_token_tree_options_are_checked():
    with pytest.raises(ValueError, match="speculative_branches"):
        EngineConfig.from_options(None, speculative_method="draft", speculative_model="d", speculative_branches=2)
    with pytest.raises(ValueError, match="speculative_branches"):
        EngineConfig.from_options(None, speculative_method="ngram", speculative_branches=0)
    c = EngineConfig.from_options(None, speculative_config='{"method": "ngram", "branches": 3}')
    assert c.speculative_branches == 3
