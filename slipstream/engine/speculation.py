"""How many drafts a step verifies: speculation only where it pays.

Whether k drafts pay depends on how many the proposer gets right (the workload, the text so far) and on what
verifying them costs, which depends on the batch: a small batch leaves the GPU waiting on memory, and k extra tokens
per sequence are almost free; a large one is compute-bound, and they cost nearly their share. Neither is modelled
here: both are measured. For each batch size (in powers of two) and each candidate k (0, 1, 2, 4, ... up to
num_speculative_tokens), the policy keeps moving averages of the output tokens and the seconds of the decode steps
run with that k, drafting and verifying included: their ratio is the rate (a tie goes to the fewer drafts). A step
takes the best k measured for its batch size, after measuring the candidates next to it (a climb: from the most drafts down to none takes a handful of steps where
drafts do not pay) and the plain step (k = 0: a climb misled by a noisy timing would otherwise stop at a k that
never paid); now and then a step tries a neighbour again, so that a changed workload (text that starts to repeat, a
batch that shrinks) is seen. Those probes are rationed by what they cost: at most one step in PROBE_EVERY, and only
while the time they lose against the best k (a probe's seconds less the seconds its tokens take at the best rate)
stays within EXPLORE_SHARE of the time spent at the best k. Where a verifying step costs five plain ones (a 135M
model at batch 14, H100, lease AK: 10 ms against 2 ms), a probe every 16 steps alone costs 15% against plain
decoding (the policy fed those step costs, tests/test_speculative.py); rationed, such a probe runs every 160 steps,
and one that costs nothing still every 16. A batch size not measured yet starts from the nearest one's best. k = 0
switches speculation off for that batch size.

A step that takes more than PAUSE_RATIO times its k's average counts as that much: the rest was a pause of the
process (a full garbage collection of an `LLM`'s heap, 100 ms or more; a compile), not the step's cost. Counted whole,
a pause that fell in a k measured rarely (the plain step, once the policy drafts, is measured only by rationed probes)
stayed in its average for hundreds of steps: the policy kept drafting where drafts lost. On an H100 at batch 256 it
measured its own plain steps at 12,379 tok/s while the plain engine ran 70,591, and kept k = 4 at 0.41-0.50x of plain
decoding (lease AY); fed those step costs and a 100 ms pause every 150-300 steps, it ran at 0.45-0.48x of the best
fixed k's rate, and at 0.98x with the clamp (scripts/draft_policy_sim.py, tests/test_speculative.py).

With overlap, a plain step costs what plain decoding's steps cost only when it is launched while another is in
flight: the first one after a verifying step (which is read before it is scheduled) starts with the device idle,
and pays its host work in full. So only plain steps launched as plain decoding launches them are timed
(`record(..., steady=False)`, one launched with nothing in flight where it could have overlapped, is not), and a
probe of the plain step lasts PROBE_RUN steps. Timed whole, the plain steps a drafting policy took now and then
ran at a half to a third of plain decoding's rate, and speculation stayed on where it lost: at batch 256 the policy
measured its plain steps at 38,115 tok/s while the plain engine ran 83,185, and ran at 0.81x (H100, lease AZ).
"""
from __future__ import annotations

PROBE_EVERY = 16  # at most one step in this many tries a k other than the best measured
EXPLORE_SHARE = 0.02  # of the time spent at the best k, the most that probing the others may lose
_WEIGHT = 0.2  # of a new measurement in the moving average
PAUSE_RATIO = 2.0  # a step's seconds count at most this many times its k's average (a pause is no cost of the step)
PROBE_RUN = 3  # steps a probe of the plain step lasts (its first, launched with nothing in flight, is not timed)
# A k's timing at a batch size is provisional until it settles: two of its steps in a row agree (seconds within
# PAUSE_RATIO of each other, and of its shortest step so far), its first two not counted, or it has been timed
# SETTLE_TIMINGS times. Until then the newer step stands (not the shorter: with overlap a step read at once after a
# pause is timed short) and the k is timed again at once, whatever its rate: at a large batch nothing else would
# re-time a k that one slow step made look bad. A run's first steps can carry one-off costs that PAUSE_RATIO cannot clamp, having no average to clamp to: on an
# H100 at batch 1 the policy timed its first two k = 16 steps at 25 ms each, 20 times a k = 16 step, never tried k = 16
# again, and ran the quote workload at 1.37x where k = 16 fixed ran 2.4-3.5x (scripts/draft_policy_sim.py).
SETTLE_TIMINGS = 4
# At a small batch the rates follow the few sequences' text, which changes (a paragraph quoted, then a line of its
# own): a timing older than STALE_STEPS steps is stale, and the next one replaces it. While drafting, a stale
# neighbour of the best k that drafts is retried at once where that costs at most one step at the best k (the plain
# step needs no retry: once the text stops paying, the drafts' rates fall below its stale one). While not drafting, the
# drafts are retried (k = 1, then the climb) once the proposer reports that its guesses would now be right
# (`record_guesses`: at least GUESS_RATE of the tokens that arrived were the ones it would have drafted first).
# A retry of the drafts after every stale spell cost 6-10% at batch 1 on text where drafts never pay; guided by the
# guesses, none is made there (scripts/draft_policy_sim.py). At a large batch the text of many sequences averages out,
# and a retry is dear: the rationed probes alone.
STALE_STEPS = 16
STALE_BATCH = 8  # the largest batch bucket that retries stale k
GUESS_RATE = 0.5


class DraftPolicy:
    def __init__(self, max_k: int) -> None:
        self.candidates = sorted({0, max_k} | {1 << i for i in range(max_k.bit_length()) if 1 << i < max_k})
        self.rate: dict[tuple[int, int], float] = {}  # (batch bucket, k) -> output tokens/s of decode steps
        self._sums: dict[tuple[int, int], tuple[float, float]] = {}  # moving averages of (tokens, seconds) a step
        self._steps = 0
        self._credit: dict[int, float] = {}  # batch bucket -> seconds that probes may still lose
        self._run: dict[int, int] = {}  # batch bucket -> plain steps a probe still has to run
        self._when: dict[tuple[int, int], int] = {}  # (batch bucket, k) -> the step it was last timed in
        self._timed: dict[tuple[int, int], int] = {}  # (batch bucket, k) -> steps timed
        self._settled: set[tuple[int, int]] = set()  # (batch bucket, k) whose timing has settled (SETTLE_TIMINGS)
        self._settling: dict[tuple[int, int], int] = {}  # (batch bucket, k) -> its timings when last timed again
        self._fastest: dict[tuple[int, int], float] = {}  # (batch bucket, k) -> its shortest step while settling
        self._guessed: dict[int, float] = {}  # batch bucket -> moving average of the proposer's first guesses right
        self._tried: dict[tuple[int, int], int] = {}  # (batch bucket, k) -> the step a stale k was last retried in
        # (batch bucket, k) -> [steps, output tokens, seconds] of every step recorded, timed or not: what each k cost
        # over a run (`slipstream bench speculative` prints it)
        self.totals: dict[tuple[int, int], list[float]] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        """The power of two at or above the batch size."""
        return 1 << max(batch - 1, 0).bit_length()

    def choose(self, batch: int) -> int:
        """The drafts per sequence for a step of `batch` decoding sequences."""
        b = self.bucket(batch)
        self._steps += 1
        if self._run.get(b):
            self._run[b] -= 1
            return 0
        rates = {k: r for (bb, k), r in self.rate.items() if bb == b}
        if not rates:
            return self._borrowed(b)
        best = max(rates, key=lambda k: (rates[k], -k))  # (a tie: the fewer drafts, the cheaper step)
        i = self.candidates.index(best)
        near = [self.candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(self.candidates)]
        unmeasured = [k for k in near if k not in rates]
        if unmeasured:  # fewer drafts first: the cheaper step to try
            return unmeasured[0]
        if 0 not in rates:  # the plain step: where timings are noisy the climb can stop at a k that only seemed to pay
            return 0
        unsettled = sorted(k for k in rates if (b, k) not in self._settled
                           and self._settling.get((b, k)) != self._timed[(b, k)])  # (not again until that one is timed)
        if unsettled:  # timed again at once (SETTLE_TIMINGS)
            self._settling[(b, unsettled[0])] = self._timed[(b, unsettled[0])]
            return self._probe(b, unsettled[0])
        regret = {k: self._regret(b, k, rates[best]) for k in near}
        if b <= STALE_BATCH:
            if best == 0:
                retry = [1] if self._guessed.get(b, 0.0) >= GUESS_RATE and self._due((b, 1)) else []
            else:
                # (not the plain step: its stale timing, if good, wins by itself once the drafts' rates fall)
                retry = [k for k in near if k and self._due((b, k)) and regret[k] <= self._sums[(b, best)][1]]
            if retry:
                self._tried[(b, retry[0])] = self._steps
                return retry[0]
        credit = self._credit.get(b, 0.0)
        if self._steps % PROBE_EVERY == 0:
            probe = near[(self._steps // PROBE_EVERY) % len(near)]
            if credit >= regret[probe]:
                self._credit[b] = credit - regret[probe]
                return self._probe(b, probe)
        # no more saved than the dearest probe needs: a cheap spell must not pay for a run of dear probes later
        self._credit[b] = min(credit + EXPLORE_SHARE * self._sums[(b, best)][1], max(regret.values()))
        return best

    def _stale(self, key: tuple[int, int]) -> bool:
        return key[0] <= STALE_BATCH and self._steps - self._when.get(key, self._steps) > STALE_STEPS

    def _due(self, key: tuple[int, int]) -> bool:
        """Stale, and not retried in the last STALE_STEPS steps (a retry that fell in a step carrying a prompt was not
        timed: it is not repeated step after step)."""
        return self._stale(key) and self._steps - self._tried.get(key, -STALE_STEPS - 1) > STALE_STEPS

    def wants_guesses(self, batch: int) -> bool:
        """Whether a step of `batch` sequences should report the proposer's guesses (`record_guesses`): at the batch
        sizes that retry stale k."""
        return self.bucket(batch) <= STALE_BATCH

    def record_guesses(self, batch: int, right: int, tokens: int) -> None:
        """Of `tokens` that arrived for a batch of `batch` sequences, `right` were what the proposer would have drafted
        first (drafted or not)."""
        if tokens:
            b = self.bucket(batch)
            self._guessed[b] = (1 - _WEIGHT) * self._guessed.get(b, right / tokens) + _WEIGHT * right / tokens

    def _probe(self, b: int, k: int) -> int:
        if k == 0:
            self._run[b] = PROBE_RUN - 1
        return k

    def _regret(self, b: int, k: int, best_rate: float) -> float:
        """The seconds a step with k drafts loses against the best rate: its time less what its tokens take at that
        rate."""
        tokens, seconds = self._sums[(b, k)]
        return max(seconds - tokens / best_rate, 0.0)

    def _borrowed(self, b: int) -> int:
        """The best k of the nearest batch size measured; with none, the most drafts (where speculation pays, it pays
        from the first steps)."""
        measured = {bb for bb, _ in self.rate}
        if not measured:
            return self.candidates[-1]
        nearest = min(measured, key=lambda bb: abs(bb.bit_length() - b.bit_length()))
        return max((k for bb, k in self.rate if bb == nearest), key=lambda k: (self.rate[(nearest, k)], -k))

    def record(self, batch: int, k: int, tokens: int, seconds: float, steady: bool = True) -> None:
        """A decode step of `batch` sequences that ran with k drafts per sequence produced `tokens` in `seconds`;
        `steady`: it was launched as plain decoding launches its steps: while another was in flight, or where it would
        be read before the next is scheduled anyway (no overlap, penalties; a plain step that was not is counted in
        `totals`, not timed).
        Tokens and seconds are averaged apart, their ratio is the rate: with overlap, how a step's time splits
        between it and the next can vary (one read late, the next at once), and a mean of per-step rates would take
        the short one's rate for the truth."""
        if seconds <= 0 or k not in self.candidates:
            return
        key = (self.bucket(batch), k)
        total = self.totals.setdefault(key, [0, 0, 0.0])
        total[0], total[1], total[2] = total[0] + 1, total[1] + tokens, total[2] + seconds
        if k == 0 and not steady:
            return
        t, s = self._sums.get(key, (tokens, seconds))
        timed = self._timed[key] = self._timed.get(key, 0) + 1
        if key not in self._settled:
            fastest = self._fastest[key] = min(self._fastest.get(key, seconds), seconds)
            # (not before a third timing: a k's first two steps may both carry a one-off cost; and against the
            # shortest too: two slow steps in a row after a good one do not settle it)
            agree = timed > 2 and max(s, seconds) <= PAUSE_RATIO * min(s, seconds) and seconds <= PAUSE_RATIO * fastest
            if agree or timed >= SETTLE_TIMINGS:
                self._settled.add(key)
            if not agree:  # the newer step stands
                t, s = tokens, seconds
        seconds = min(seconds, PAUSE_RATIO * s)
        weight = 1.0 if self._stale(key) else _WEIGHT
        t, s = (1 - weight) * t + weight * tokens, (1 - weight) * s + weight * seconds
        self._when[key] = self._steps
        self._sums[key] = (t, s)
        self.rate[key] = t / s
