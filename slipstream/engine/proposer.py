"""Draft proposers for speculative decoding: guesses of a sequence's next tokens that one step verifies.

The runner verifies a decode token and k drafts in one step by "accept while the draw equals the draft, then
take the draw": the draws are the ones plain decoding would make (same seeds, same positions), so the output is
exactly that of decoding without drafts — for greedy, seeded and unseeded sampling alike — and a correct draft
saves a step. (For a proposer whose guesses are deterministic this is rejection sampling with q = 1.)

`NgramProposer` (prompt lookup): find the longest recent n-gram that ends the sequence and occurred before, and
propose the k tokens that followed it then. It pays off where outputs repeat their input (code edits,
extraction, summaries quoting the source, multi-turn chat) and costs nothing where it finds no match. Each
sequence keeps an index from n-gram to the position after its latest occurrence, updated as tokens arrive.
"""
from __future__ import annotations


class NgramProposer:
    def __init__(self, num_tokens: int, min_n: int = 2, max_n: int = 4) -> None:
        if num_tokens < 1 or not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram proposer needs num_tokens >= 1 and 1 <= min_n <= max_n, got {num_tokens}, {min_n}, {max_n}")
        self.k, self.min_n, self.max_n = num_tokens, min_n, max_n
        self._index: dict[int, tuple[int, list[dict[tuple[int, ...], int]]]] = {}  # seq id -> (indexed up to, maps)

    def propose(self, seq_id: int, ids: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens to follow `ids` (the sequence's tokens so far)."""
        done, maps = self._index.get(seq_id) or (0, [{} for _ in range(self.max_n + 1)])
        # Index every n-gram that ends before the last token: its continuation is known.
        for end in range(max(done, self.min_n), len(ids)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                maps[n][tuple(ids[end - n : end])] = end
        self._index[seq_id] = (len(ids), maps)
        k = min(self.k, limit)
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(ids)), self.min_n - 1, -1):
            start = maps[n].get(tuple(ids[len(ids) - n :]))
            if start is not None:
                return ids[start : start + k]
        return []

    def forget(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)
