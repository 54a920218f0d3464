"""Draft proposers for speculative decoding: guesses of a sequence's next tokens that one step verifies.

The runner verifies a decode token and k drafts in one step by "accept while the draw equals the draft, then
take the draw": the draws are the ones plain decoding would make (same seeds, same positions), so the output is
exactly that of decoding without drafts — for greedy, seeded and unseeded sampling alike — and a correct draft
saves a step. (For a proposer whose guesses are deterministic this is rejection sampling with q = 1.)

`NgramProposer` (prompt lookup): find the longest recent n-gram that ends the sequence and occurred before, and
propose the k tokens that followed it then. It pays off where outputs repeat their input (code edits,
extraction, summaries quoting the source, multi-turn chat) and costs nothing where it finds no match. Each
sequence keeps an index from n-gram to the position after its latest occurrence, updated as tokens arrive.

`DraftModelProposer`: a smaller model with the target's token ids drafts k tokens (k chained one-token steps on
the device, read once at the end). Its KV pool has as many pages as the target's and uses the target's block
tables, so the scheduler's page reservations cover both models. It draws each draft as the target will draw that
position: same temperature and filters, same seed and output index, so the same exponential noise (the sampler's
hash of seed, position and token). Where the two models' distributions agree the draws agree too, sampled or
greedy, and the output stays exactly the target's own (it is the target's draws that are kept).

`DraftHeadProposer`: a one-layer head reads the target's own hidden states, so it drafts as well as a much larger
draft model: an EAGLE-3 head (models/eagle3.py) the states of three of the target's layers, an MTP module
(models/mtp.py, shipped inside the model's checkpoint) its final state. After each target step it takes in the
states that step computed (`observe`); once the next step is scheduled it draws the first draft from its output at
the last token and chains on its own output for the rest. Draws follow the target's rule and seeds, as the draft
model's do.

A proposer answers, for the engine core: `observe` after every step is read (the sequences it computed, with
their pages),
`propose` before a step is scheduled (the drafts, or placeholders whose slots the scheduler reserves), `refine`
once it is scheduled (a model drafts then: its KV writes need those slots), `accepted` when the verdict is read,
`forget` when a sequence ends.
"""
from __future__ import annotations

from typing import Any

from slipstream.runner.batch import SamplingRow, SeqStep, Step, tree_depths
from slipstream.sampling_params import SamplingParams


# A token tree's drafts are chosen by a score, most likely first: the sum of the weights of the occurrences whose
# continuation passes through the draft (the most recent weighs 1, each older one half the one after it) times a
# discount per step from the root: how often a draft whose parent was kept is kept too, as measured on this
# proposer's verdicts (a moving count; _PRIOR_KEPT until there are some). Where drafts are kept nine times in ten (text
# that quotes its source) a tree is almost the latest continuation's chain; where they are kept less often, branches
# come before deep drafts. A draft scores below its parent, so any head of the order is a tree: the scheduler may
# cut it anywhere.
_PRIOR_KEPT = (4.0, 1.0)  # (kept, missed) pseudo-counts: a discount of 0.8
_FORGET = 0.98  # of the counts, kept at each verdict (about the last 50 weigh)


class NgramProposer:
    def __init__(self, min_n: int = 2, max_n: int = 4, branches: int = 1) -> None:
        """`branches` > 1: `propose_tree` merges the continuations of the n-gram's last `branches` occurrences."""
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram proposer needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.branches = min_n, max_n, branches
        self._index: dict[int, tuple[int, list[dict[int, int]]]] = {}  # seq id -> (indexed up to, maps)
        # with branches: seq id -> per n, the position after an n-gram's occurrence -> after its occurrence before
        self._earlier: dict[int, list[dict[int, int]]] = {}
        self._depth: dict[int, int] = {}  # seq id -> its last tree's depth
        self._kept, self._missed = _PRIOR_KEPT  # moving counts of drafts kept after a kept parent, and of misses

    def propose(self, seq_id: int, ids: list[int], limit: int, known: int | None = None) -> list[int]:
        """Up to `limit` draft tokens to follow `ids` (the sequence's tokens so far; past `known` of them, tokens
        guessed to follow: looked up, not indexed, as the sequence may not keep them)."""
        maps = self._catch_up(seq_id, ids, len(ids) if known is None else known)
        if limit <= 0:
            return []
        found = self._lookup(maps, ids, len(ids))
        return [] if found is None else ids[found[0] : found[0] + limit]

    def _catch_up(self, seq_id: int, ids: list[int], end: int) -> list[dict[int, int]]:
        """Index every n-gram of `ids` that ends before `end`: its continuation is known. An n-gram's key is one
        integer, its tokens 32 bits each, the last one lowest, built up token by token (a step that drafts after
        overlapped ones indexes every sequence's tokens since). The lookup builds its keys the same way, with no
        slices and tuples of the last tokens: half the host time of a drafting step's proposals at 256 sequences
        (scripts/ngram_costs.py)."""
        done, maps = self._index.get(seq_id) or (0, [{} for _ in range(self.max_n + 1)])
        earlier = self._earlier.setdefault(seq_id, [{} for _ in range(self.max_n + 1)]) if self.branches > 1 else None
        for e in range(max(done, self.min_n), end):
            key = 0
            for n in range(1, min(self.max_n, e) + 1):
                key |= ids[e - n] << (32 * n - 32)
                if n >= self.min_n:
                    if earlier is not None and key in maps[n]:
                        earlier[n][e] = maps[n][key]
                    maps[n][key] = e
        self._index[seq_id] = (max(done, end), maps)
        return maps

    def propose_tree(self, seq_id: int, ids: list[int], limit: int) -> tuple[list[int], list[int]]:
        """Up to `limit` drafts to follow `ids` as a token tree: (tokens, each one's parent: an earlier draft's index,
        or -1 for the token after `ids`), the continuations of the longest n-gram's last `branches` occurrences merged,
        the likeliest drafts first (see _PRIOR_KEPT)."""
        maps = self._catch_up(seq_id, ids, len(ids))
        if limit <= 0:
            return [], []
        found = self._lookup(maps, ids, len(ids))
        if found is None:
            return [], []
        start, n = found
        earlier = self._earlier[seq_id][n] if self.branches > 1 else {}
        # a trie of the continuations: node -> (token, parent node, score); children by (parent node, token)
        nodes: list[tuple[int, int, float]] = []
        child: dict[tuple[int, int], int] = {}
        weight, discount = 1.0, self._kept / (self._kept + self._missed)
        for _ in range(self.branches):
            parent, score = -1, weight
            for t in ids[start : start + limit]:
                score *= discount
                node = child.get((parent, t))
                if node is None:
                    node = child[(parent, t)] = len(nodes)
                    nodes.append((t, parent, 0.0))
                tok, par, total = nodes[node]
                nodes[node] = (tok, par, total + score)
                parent = node
            start = earlier.get(start)
            if start is None:
                break
            weight /= 2
        # the best `limit` nodes, each after its parent (it scores less), renumbered in that order
        order = sorted(range(len(nodes)), key=lambda i: -nodes[i][2])[:limit]
        place = {node: i for i, node in enumerate(order)}
        parents = [place.get(nodes[i][1], -1) for i in order]
        self._depth[seq_id] = max(tree_depths(parents))
        return [nodes[i][0] for i in order], parents

    def _lookup(self, maps: list[dict[int, int]], ids: list[int], end: int) -> tuple[int, int] | None:
        """(where the tokens that followed the longest n-gram ending `ids[:end]` begin (its latest earlier occurrence),
        that n), if it occurred before."""
        keys, key = [0], 0  # keys[n]: the last n tokens'
        for n in range(1, min(self.max_n, end) + 1):
            key |= ids[end - n] << (32 * n - 32)
            keys.append(key)
        for n in range(len(keys) - 1, self.min_n - 1, -1):
            start = maps[n].get(keys[n])
            if start is not None:
                return start, n
        return None

    def first_guesses(self, seqs: list[Any]) -> tuple[int, int]:
        """For the output tokens that arrived since the sequences were last indexed: (how many are the first draft the
        lookup would have proposed before them, how many arrived). The draft policy reads what drafting would yield
        from this where it does not draft (engine/speculation.py); a step that drafts indexes the tokens anyway. A
        token's guess looks only at the tokens before it (indexed up to it, one token at a time)."""
        right = arrived = 0
        for seq in seqs:
            ids = seq.token_ids
            first = max(self._index.get(seq.seq_id, (0,))[0], seq.num_prompt_tokens)
            maps = self._catch_up(seq.seq_id, ids, first)  # (the prompt: indexed, not guessed)
            for end in range(first, len(ids)):
                found = self._lookup(maps, ids, end)
                right += found is not None and ids[found[0]] == ids[end]
                maps = self._catch_up(seq.seq_id, ids, end + 1)
            arrived += len(ids) - first
        return right, arrived

    def observe(self, seqs: list[tuple[Any, list[int]]]) -> None:
        pass  # the index catches up in propose

    def refine(self, scheduled: list[tuple[Any, int]], budget: int) -> None:
        pass  # the drafts were final when proposed

    def accepted(self, seq_id: int, num_accepted: int, path: list[int] | None = None) -> None:
        """A verdict on the sequence's last tree: `num_accepted` drafts kept, then a miss unless the path reached the
        tree's depth (a path that ended at a shallower leaf, or at the end of a tree the scheduler cut, counts a miss
        too: a small bias to branching)."""
        depth = self._depth.pop(seq_id, None)
        if depth is not None:
            self._kept = _FORGET * self._kept + num_accepted
            self._missed = _FORGET * self._missed + (num_accepted < depth)

    def forget(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)
        self._earlier.pop(seq_id, None)
        self._depth.pop(seq_id, None)


def _as_drafted(p: SamplingParams) -> SamplingParams:
    """The draw of a draft: the target's temperature, filters and seed; no penalties, bias, logprobs or grammar
    (they only move where the target's own draw lands; the verdict compares with that)."""
    return SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, max_tokens=None)


class DraftModelProposer:
    def __init__(self, runner: Any) -> None:
        """`runner`: the draft model's ModelRunner, its pool as many pages as the target's."""
        self.runner = runner
        # seq id -> (positions whose draft KV holds the sequence's tokens, the sequence's preemptions then: a
        # preempted sequence lost its pages, and the draft starts over)
        self._valid: dict[int, tuple[int, int]] = {}
        self._fed: dict[int, tuple[int, int]] = {}  # seq id -> (its length, drafts) at the last refine
        self._params: dict[int, SamplingParams] = {}  # seq id -> how its drafts are drawn

    def observe(self, seqs: list[tuple[Any, list[int]]]) -> None:
        pass  # the draft model catches up in refine, within the step's budget

    def propose(self, seq_id: int, ids: list[int], limit: int, known: int | None = None) -> list[int]:
        return [0] * limit  # placeholders: the scheduler reserves their slots, refine() fills them

    def refine(self, scheduled: list[tuple[Any, int]], budget: int) -> None:
        """Draft for the scheduled sequences (each with the number of drafts the step reserved): catch the draft's KV
        up to each sequence's last token, at most `budget` tokens in all (a long prompt takes several steps, and
        draws no drafts until it is done), then draw draft 1 at the last token and k - 1 more in one-token steps,
        each fed the draws of the one before on the device. A sequence left without drafts keeps []."""
        for seq, _ in scheduled:
            seq.draft_token_ids = []
        start = {}
        for seq, n in scheduled:
            if n:
                valid, preemptions = self._valid.get(seq.seq_id, (0, seq.num_preemptions))
                start[seq.seq_id] = valid if preemptions == seq.num_preemptions else 0
        catch_up = []
        for seq, n in scheduled:  # every token but the last, within the budget
            v = start.get(seq.seq_id, seq.num_tokens)
            take = min(seq.num_tokens - 1 - v, budget)
            if take > 0:
                catch_up.append(SeqStep(seq.seq_id, seq.token_ids[v : v + take], v, seq.block_table))
                start[seq.seq_id] = v + take
                self._valid[seq.seq_id] = (v + take, seq.num_preemptions)
                budget -= take
        if catch_up:
            self.runner.draw(Step(catch_up))
        todo = [(seq, n) for seq, n in scheduled if n and start[seq.seq_id] == seq.num_tokens - 1]
        if not todo:
            return
        # One step for every sequence's last token (a plain decode step: CUDA graphs), then the chained ones; row j
        # draws output index num_output_tokens + j, as the target's row after j drafts will.
        def row(seq: Any, j: int) -> SamplingRow:
            p = self._params.get(seq.seq_id) or self._params.setdefault(seq.seq_id, _as_drafted(seq.params))
            return SamplingRow(p, seq.seed, seq.num_output_tokens + j)

        rounds = [self.runner.draw(Step([SeqStep(s.seq_id, s.token_ids[-1:], s.num_tokens - 1, s.block_table, 0, row(s, 0))
                                         for s, _ in todo]))]
        for j in range(1, max(n for _, n in todo)):
            rounds.append(self.runner.draw(Step([SeqStep(s.seq_id, [0], s.num_tokens - 1 + j, s.block_table, 0, row(s, j),
                                                         feed_previous=True) for s, n in todo if n > j])))
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq, _ in todo}
        for ids, tokens in rounds:  # read after every round is queued: the device runs them back to back
            for sid, t in zip(ids, tokens.tolist()):
                drafts[sid].append(t)
        for seq, n in todo:
            seq.draft_token_ids = drafts[seq.seq_id]
            self._fed[seq.seq_id] = (seq.num_tokens, n)
            self._valid[seq.seq_id] = (seq.num_tokens, seq.num_preemptions)

    def accepted(self, seq_id: int, num_accepted: int, path: list[int] | None = None) -> None:
        """Drafts 1..n - 1 were fed at the positions after the last token: those accepted hold true tokens."""
        fed = self._fed.pop(seq_id, None)
        if fed is not None and seq_id in self._valid:
            length, n = fed
            self._valid[seq_id] = (length + min(num_accepted, n - 1), self._valid[seq_id][1])

    def forget(self, seq_id: int) -> None:
        self._valid.pop(seq_id, None)
        self._fed.pop(seq_id, None)
        self._params.pop(seq_id, None)


_PRIOR_RUNNER_UP = (1.0, 3.0)  # (kept, tried) pseudo-counts: a runner-up is the draw a third of the times the head's is not


class DraftHeadProposer:
    def __init__(self, runner: Any, branches: int = 1) -> None:
        """`runner`: the head's DraftHeadRunner (beside the target's runner, whose hidden states it reads).
        `branches` > 1: token trees, the head's chain with at its first drafts the `branches - 1` runners-up of each
        draw beside it (as many as pay: `_shape`)."""
        self.runner = runner
        self.alternatives = branches - 1
        self._params: dict[int, SamplingParams] = {}  # seq id -> how its drafts are drawn
        # moving counts: chain drafts kept after a kept parent and missed; runners-up kept where their chain draft was
        # missed, and such misses
        (self._kept, self._missed), (self._up_kept, self._up_tried) = _PRIOR_KEPT, _PRIOR_RUNNER_UP
        self._trees: dict[int, tuple[int, list[int]]] = {}  # seq id -> (its last tree's chain length, runners-up a depth)

    def _shape(self, n: int) -> tuple[int, list[int]]:
        """How n drafts split between the chain and the runners-up (a count beside each chain draft), one likeliest
        draft at a time, as measured: the chain's next draft, at depth d, is kept with probability a^d (a: how often a
        draft whose parent was kept is kept); a runner-up beside its draft at depth d with a^(d-1) (1 - a) u /
        (branches - 1) (u: how often one of them was the draw where the chain's was not). A runner-up can stand only
        beside a chain draft (it is that draw's), so the chain's next draft is taken first where it is needed."""
        a = self._kept / (self._kept + self._missed)
        u = self._up_kept / self._up_tried / self.alternatives
        chain, ups = 0, []
        for _ in range(n):
            # the shallowest chain draft with room beside it: its runners-up are the likeliest
            d = next((d for d in range(chain) if ups[d] < self.alternatives), None)
            if d is not None and a**d * (1 - a) * u > a ** (chain + 1):
                ups[d] += 1
            else:
                chain += 1
                ups.append(0)
        return chain, ups

    def _row(self, seq: Any, j: int) -> SamplingRow:
        p = self._params.get(seq.seq_id) or self._params.setdefault(seq.seq_id, _as_drafted(seq.params))
        return SamplingRow(p, seq.seed, seq.num_output_tokens + j)

    def observe(self, seqs: list[tuple[Any, list[int]]]) -> None:
        """The sequences of the step just read, with their pages then: the head takes in what the target computed
        (for those that ended too, whose pages the prefix cache may keep; they draft no more)."""
        self.runner.catch_up([(s.seq_id, s.token_ids, table, not s.is_finished) for s, table in seqs])

    def propose(self, seq_id: int, ids: list[int], limit: int, known: int | None = None) -> list[int]:
        # placeholders (refine draws them) where the head has read the sequence's last token: only a sequence whose
        # last step the head read can draft
        return [0] * limit if self.runner.has_first(seq_id, len(ids)) else []

    def refine(self, scheduled: list[tuple[Any, int]], budget: int) -> None:
        """Draw the drafts the step reserved slots for (the head's KV writes go to those slots). A tree's chain comes
        first, so its drafts sit in the slots of their positions, where the head writes; the runners-up after it."""
        shapes = {s.seq_id: self._shape(n) if self.alternatives else (n, []) for s, n in scheduled if n}
        todo = [(s.seq_id, s.num_tokens, s.block_table, [self._row(s, j) for j in range(shapes[s.seq_id][0])])
                for s, n in scheduled if n]
        drafts, others = self.runner.chain(todo, self.alternatives) if todo else ({}, {})
        for seq, _ in scheduled:
            seq.draft_token_ids, seq.draft_parents = drafts.get(seq.seq_id, []), None
            if self.alternatives and seq.draft_token_ids:
                chain, ups = shapes[seq.seq_id]
                parents, placed = list(range(-1, chain - 1)), [0] * chain
                for d, count in enumerate(ups):  # beside the chain's draft at depth d + 1: its draw's runners-up
                    for t in others[seq.seq_id][d][:count]:
                        if t >= 0:  # (-1: no other token could be drawn)
                            seq.draft_token_ids.append(t)
                            parents.append(d - 1)
                            placed[d] += 1
                seq.draft_parents = parents
                self._trees[seq.seq_id] = (chain, placed)

    def accepted(self, seq_id: int, num_accepted: int, path: list[int] | None = None) -> None:
        """The head reads the accepted tokens' states in observe; a tree's verdict moves the measured rates."""
        tree = self._trees.pop(seq_id, None)
        if tree is None:
            return
        chain, ups = tree
        path = list(range(num_accepted)) if path is None else path  # (a tree without runners-up verified as a chain)
        on_chain = sum(1 for i in path if i < chain)
        self._kept = _FORGET * self._kept + on_chain
        if on_chain < chain:  # the chain's next draft was not the draw
            self._missed = _FORGET * self._missed + 1
            if ups[on_chain]:
                self._up_tried = _FORGET * self._up_tried + 1
                self._up_kept = _FORGET * self._up_kept + (len(path) > on_chain)
        else:
            self._missed *= _FORGET

    def forget(self, seq_id: int) -> None:
        self._params.pop(seq_id, None)
        self._trees.pop(seq_id, None)
