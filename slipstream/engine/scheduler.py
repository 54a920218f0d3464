"""Continuous batching with chunked prefill and preemption by recompute.

Every step gets a token budget (`max_num_batched_tokens`). Running sequences are served first, in admission
order: a decode takes one token (plus its draft tokens to verify, if a proposer gave it some), an unfinished
prefill takes the next chunk. What is left of the budget admits
waiting sequences first-come first-served, their prompts chunked to fit, so prefill chunks and decodes share one
step. While sequences are decoding, the engine may cap a step's prefill tokens (`prefill_budget`) so that a long
prompt arriving does not stall every running stream for the length of its prefill. When the pool has no page for a running sequence, the most recently admitted one is preempted: its pages
are freed and it waits at the head of the queue to recompute its prompt and the tokens it already produced.
Sampling is seeded per (request, position), so a preempted request finishes with the same output.

The scheduler never touches tensors: it returns a `ScheduledBatch` of sequences and token counts, which the engine
core turns into the runner's plain-data step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from slipstream.config import SchedulerConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.radix_cache import RadixCache
from slipstream.engine.sequence import Sequence, SeqStatus

_RANK_WINDOW = 256  # cache-aware ordering looks at this many queued sequences, bounding its per-step cost


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens computed this step, drafts included
    num_drafts: list[int] = field(default_factory=list)  # of which draft tokens (the head of seq.draft_token_ids)
    num_preempted: int = 0

    def add(self, seq: Sequence, n: int, drafts: int = 0) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.num_drafts.append(drafts)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def carries_prompt(self) -> bool:
        """Some sequence prefills (every other computes one token besides its drafts): sums, no loop in Python."""
        return self.num_tokens - sum(self.num_drafts) > len(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, prefix_cache: RadixCache | None = None) -> None:
        self.config = config
        self.bm = block_manager
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self._enqueued_at: dict[int, int] = {}  # seq_id -> step it (re)entered the queue, for starvation bounds

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._enqueued_at[seq.seq_id] = self.num_steps

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, prefill_budget: int | None = None, drafts: bool = True) -> ScheduledBatch:
        """`prefill_budget`: while some sequence is decoding, at most this many prefill tokens in the step (the
        engine sizes it so that a step, and so every running stream's next token, is not held up for long).
        `drafts`: verify the sequences' draft tokens (False: a plain step, whatever drafts they still hold)."""
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        if prefill_budget is not None and not any(s.num_tokens - s.num_computed_tokens == 1 for s in self.running):
            prefill_budget = None  # nobody is waiting for a token: prefill at full speed
        prefill_left = budget if prefill_budget is None else prefill_budget
        batch = ScheduledBatch()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens >= seq.max_total_tokens:
                i += 1  # its pending token is its last: nothing more to compute
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            num_drafts = 0
            if seq.num_tokens - seq.num_computed_tokens == 1:  # a decode
                if drafts:
                    # Drafts sit at positions num_tokens.. and must stay inside the budget and max_model_len. (The
                    # proposer gave drafts only where they may follow the tokens it knows: behind a step in flight,
                    # only where the step may be planned before that one's verdict is read.)
                    num_drafts = max(0, min(len(seq.draft_token_ids), budget - 1, self.config.max_model_len - seq.num_tokens))
                n += num_drafts
            else:
                n = min(n, prefill_left)
                if n == 0:
                    i += 1
                    continue
                prefill_left -= n
            need = min(seq.num_computed_tokens + n, self.config.max_model_len)
            if need > len(seq.block_table) * self.bm.block_size:  # most decodes still fit their last page
                if not self._make_room(seq, need, batch):
                    break  # `seq` itself was preempted; it was the last running sequence
                self._allocate(seq, need)
            batch.add(seq, n, num_drafts)
            budget -= n
            i += 1
        if batch.num_preempted == 0:
            self._reorder_waiting()
            self._admit(batch, min(budget, prefill_left))
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        cache = self.prefix_cache
        skipped: list[Sequence] = []
        prefilling = [s for s in self.running if s.num_computed_tokens < s.num_prompt_tokens] if cache is not None else []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            # prompt_logprobs: a cached prefix would skip the positions that score the prompt
            if cache is not None and not (seq.params.prompt_logprobs is not None and seq.index == 0):
                cache.match(seq)
                if any(self._computing_my_next_page(seq, other) for other in prefilling):
                    # Its next page is being computed right now (a shared prompt sent many times at once, n > 1
                    # siblings): wait until the page is cached instead of computing it twice.
                    self.bm.free(seq)
                    seq.num_computed_tokens = 0
                    skipped.append(seq)
                    continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                self.bm.free(seq)  # waiting sequences hold no pages, so they can never deadlock the pool
                seq.num_computed_tokens = 0
                skipped.append(seq)
                break
            self._enqueued_at.pop(seq.seq_id, None)
            self._allocate(seq, seq.num_computed_tokens + n)
            if cache is not None:
                cache.note_admitted(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            prefilling.append(seq)
            batch.add(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _computing_my_next_page(self, seq: Sequence, other: Sequence) -> bool:
        """Is `other`'s unfinished prefill computing the first full page that the cache could not give `seq`?"""
        bs = self.bm.block_size
        start = seq.num_computed_tokens  # page-aligned: the cache hands out whole pages
        end = start + bs
        if end > min(seq.num_prompt_tokens, other.num_prompt_tokens) or other.num_computed_tokens > start:
            return False
        a, b = seq.token_ids, other.token_ids
        return a[start:end] == b[start:end] and a[:start] == b[:start]  # cheap page test first; rarely the prefix

    def _allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s table; cached pages nobody uses are evicted first when the free list runs short."""
        short = self.bm.blocks_needed(seq, num_tokens) - self.bm.num_unused_blocks
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        self.bm.allocate(seq, num_tokens)

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt from the tail of `running` until `seq` can cover `num_tokens`; False if `seq` went itself."""
        while not self.bm.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self.preempt(victim)
            batch.num_preempted += 1
            if victim is seq:
                return False
        return True

    def _reorder_waiting(self) -> None:
        """Cache-aware order: longest cached prefix first, but anyone waiting too long keeps FCFS priority."""
        cache = self.prefix_cache
        if not self.config.cache_aware or cache is None or len(self.waiting) < 2:
            return
        deadline = self.num_steps - self.config.max_wait_steps
        head = [self.waiting.popleft() for _ in range(min(len(self.waiting), _RANK_WINDOW))]
        starving = [s for s in head if self._enqueued_at.get(s.seq_id, self.num_steps) <= deadline]
        rest = [s for s in head if self._enqueued_at.get(s.seq_id, self.num_steps) > deadline]
        starving.sort(key=lambda s: self._enqueued_at.get(s.seq_id, 0))
        rest.sort(key=lambda s: -cache.peek_match_len(s.token_ids))  # stable: equal matches stay FCFS
        self.waiting.extendleft(reversed(starving + rest))

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._enqueued_at[seq.seq_id] = self.num_steps

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from whichever queue holds it and release its pages."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._enqueued_at.pop(seq.seq_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED
