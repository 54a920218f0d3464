"""Request and sequence state inside the engine core. Plain Python: the scheduler and block manager work on these,
never on tensors. Text (detokenization, stop strings) is not kept here: the output processor owns it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from slipstream.runner.batch import PromptScore
from slipstream.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: sequences live in queues and are removed by identity
class Sequence:
    """One sample of a request: its tokens, how many of them have KV in the cache, and its blocks."""

    seq_id: int
    request: "Request"
    index: int  # which of the request's n samples
    token_ids: list[int]
    seed: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    # Proposed continuations (speculative decoding) that the next decode step verifies; each drafting step proposes
    # afresh for every running sequence, and a plain step verifies none.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_parents: list[int] | None = None  # a token tree's (runner/batch.SeqStep.draft_parents); None: a chain
    # The (length, last token) its tokens must have once the step in flight is read for the drafts proposed behind that
    # step to follow them: they guess its outcome (EngineCore._propose).
    drafts_follow: tuple[int, int] = (0, -1)
    all_accepted: bool = True  # the last verdict read kept every draft (the next is planned behind only then)
    # Tokens of launched steps whose results the core has not read yet, counted as the plan counts them: a drawn
    # token a step, and its drafts as if all were accepted (the engine launches step N + 1 before it reads step N).
    # They count in num_tokens: the scheduler plans with them.
    num_pending: int = 0
    max_total_tokens: int = 1 << 62  # the sequence ends at this many tokens (max_tokens, max_model_len)
    # prompt_logprobs: prompt positions whose scores are launched (a recomputed prompt is not scored again), and the
    # scores read so far, sent with the sequence's first token
    num_prompt_scored: int = 0
    prompt_scores: list[PromptScore] = field(default_factory=list)
    num_prompt_tokens: int = field(init=False)  # read every step: an attribute, not a property

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.request.prompt_token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending


    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Outputs drawn so far, pending ones included (the output index of the next draw)."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
