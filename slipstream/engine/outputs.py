"""What the engine reports.

`SeqDelta` is the engine core's token-level output: per sequence and step, the new token ids (and logprobs)
and, once it ends, why. It is plain data (a msgspec struct), so the core can run in another process and send a
step's deltas as one message. `RequestOutput` is what users see: text, detokenized and cut at stop strings by
the output processor, which runs beside the API (in the server's front-end process, or in-process for `LLM`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from slipstream.runner.batch import PromptScore


class SeqDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # per new token: {token_id: logprob}, the sampled token first
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[PromptScore] | None = None  # prompt tokens 1.. (prompt_logprobs), with the first delta
    draft_tokens: int = 0  # speculative decoding: drafts this step verified for the sequence, and of those accepted
    accepted_draft_tokens: int = 0


@dataclass(eq=False)
class CompletionOutput:
    """One sample of a request as of one report. Its token ids and logprobs are the first `num_tokens` entries of
    lists that only grow, shared by all the sample's reports (`token_ids` and `logprobs` copy them when read): a
    stream's report costs what is new in it. Copied into every report, they made the front end's time per token grow
    with the output's length (32 streams, `scripts/frontend_costs.py`: 18.8 us a token over 5,000 tokens, 4.8
    shared)."""

    index: int
    text: str  # text released so far (held-back text that might start a stop string is not in it yet)
    num_tokens: int  # tokens drawn so far
    all_token_ids: list[int] = field(repr=False)  # the shared lists: read through token_ids and logprobs
    all_logprobs: list[dict[int, float]] | None = field(repr=False)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_tokens]

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        """Per token: {token_id: logprob}, the sampled token first; None unless the request asked for logprobs."""
        return None if self.all_logprobs is None else self.all_logprobs[: self.num_tokens]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the drawn tokens' logprobs (None without `logprobs`), as vLLM reports it."""
        if self.logprobs is None:
            return None
        return sum(lp[t] for lp, t in zip(self.logprobs, self.token_ids))


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # speculative decoding, over the request's samples: a sequence's verifying steps, the drafts they verified and
    # of those accepted
    num_drafts: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verifying step yielded on average: 1 + its accepted drafts."""
        return 1 + self.accepted_draft_tokens / self.num_drafts if self.num_drafts else None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # prompt_logprobs: per prompt token, None for the first (nothing comes before it), then its score; from the
    # request's first output on
    prompt_logprobs: list[PromptScore | None] | None = None

    def then(self, newer: "RequestOutput") -> "RequestOutput":
        """`newer` with the deltas of both: what a consumer that missed this output must be told next."""
        for old, new in zip(self.outputs, newer.outputs):
            new.delta_text = old.delta_text + new.delta_text
            new.delta_token_ids = old.delta_token_ids + new.delta_token_ids
            if new.delta_logprobs is not None and old.delta_logprobs is not None:
                new.delta_logprobs = old.delta_logprobs + new.delta_logprobs
        return newer
