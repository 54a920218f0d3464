"""How many drafts a step verifies: speculation only where it pays.

Whether k drafts pay depends on how many the proposer gets right (the workload, the text so far) and on what
verifying them costs, which depends on the batch: a small batch leaves the GPU waiting on memory, and k extra tokens
per sequence are almost free; a large one is compute-bound, and they cost nearly their share. Neither is modelled
here: both are measured. For each batch size (in powers of two) and each candidate k (0, 1, 2, 4, ... up to
num_speculative_tokens), the policy keeps a moving average of the output tokens per second that decode steps run
with that k achieved, drafting and verifying included. A step takes the best k measured for its batch size; every
PROBE_EVERY-th step tries another, so that a changed workload (text that starts to repeat, a batch that shrinks) is
seen. k = 0 switches speculation off for that batch size.
"""
from __future__ import annotations

PROBE_EVERY = 16  # one step in this many tries a k other than the best measured
_WEIGHT = 0.2  # of a new measurement in the moving average


class DraftPolicy:
    def __init__(self, max_k: int) -> None:
        self.candidates = sorted({0, max_k} | {1 << i for i in range(max_k.bit_length()) if 1 << i < max_k})
        self.rate: dict[tuple[int, int], float] = {}  # (batch bucket, k) -> output tokens/s of decode steps
        self._steps = 0

    @staticmethod
    def bucket(batch: int) -> int:
        """The power of two at or above the batch size."""
        return 1 << max(batch - 1, 0).bit_length()

    def choose(self, batch: int) -> int:
        """The drafts per sequence for a step of `batch` decoding sequences."""
        b = self.bucket(batch)
        self._steps += 1
        unmeasured = [k for k in self.candidates if (b, k) not in self.rate]
        if unmeasured:  # the most drafts first: where speculation pays, it pays from the first steps
            return unmeasured[-1]
        ranked = sorted(self.candidates, key=lambda k: self.rate[(b, k)], reverse=True)
        if self._steps % PROBE_EVERY == 0:
            return ranked[1 + (self._steps // PROBE_EVERY) % (len(ranked) - 1)]
        return ranked[0]

    def record(self, batch: int, k: int, tokens: int, seconds: float) -> None:
        """A decode step of `batch` sequences that ran with k drafts per sequence produced `tokens` in `seconds`."""
        if seconds <= 0 or k not in self.candidates:
            return
        key, rate = (self.bucket(batch), k), tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else (1 - _WEIGHT) * old + _WEIGHT * rate
