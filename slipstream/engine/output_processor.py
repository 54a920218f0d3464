"""Token ids out of the engine core -> text for the user: incremental detokenization, stop strings, deltas.

It runs where the API runs (the server's front-end process, or in-process for `LLM`), never in the engine
core's loop. A stop string is only visible here, so when one appears the sequence is finished here at once and
the caller tells the core to stop it (`process` returns those sequences); tokens the core produced for it in the
meantime are dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from slipstream.engine.detokenizer import IncrementalDetokenizer
from slipstream.engine.outputs import CompletionOutput, PromptScore, RequestMetrics, RequestOutput, SeqDelta
from slipstream.sampling_params import SamplingParams


@dataclass(eq=False)
class _SeqText:
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # only ever appended to: the reports share them
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    emitted_text_len: int = 0  # what streaming has already released
    emitted_tokens: int = 0


@dataclass(eq=False)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool  # report progress every step; otherwise only the final output (and detokenize once)
    seqs: list[_SeqText]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[PromptScore | None] | None = None
    num_drafts: int = 0  # speculative decoding (RequestMetrics)
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def finished(self) -> bool:
        for s in self.seqs:  # (asked of every report: a loop costs a sixth of all() over a generator)
            if s.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, stream: bool) -> None:
        seqs = [_SeqText(IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)) for _ in range(params.n)]
        self.requests[request_id] = _RequestState(request_id, prompt, prompt_ids, params, stream, seqs)

    def process(self, deltas: list[SeqDelta]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Apply one step's deltas: the outputs to report, and the sequences the core must stop (stop strings)."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        to_stop: list[tuple[str, int]] = []
        for d in deltas:
            req = self.requests.get(d.request_id)
            if req is None or req.seqs[d.index].finish_reason is not None:
                continue  # aborted, or past a stop string: the core has not heard yet
            if req.first_token_time is None:
                req.first_token_time = now
            req.num_cached_tokens = max(req.num_cached_tokens, d.num_cached_tokens)
            if d.draft_tokens:
                req.num_drafts += 1
                req.draft_tokens += d.draft_tokens
                req.accepted_draft_tokens += d.accepted_draft_tokens
            if d.prompt_logprobs is not None:
                req.prompt_logprobs = [None, *d.prompt_logprobs]
            if self._apply(req, req.seqs[d.index], d) and d.finish_reason is None:
                to_stop.append((d.request_id, d.index))
            touched[d.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
                outputs.append(self._output(req, now))
            elif req.stream:
                outputs.append(self._output(req, None))
        return outputs, to_stop

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        return self._output(req, time.monotonic())

    def _apply(self, req: _RequestState, seq: _SeqText, d: SeqDelta) -> bool:
        """Take the new tokens; True if a stop string ended the sequence."""
        p = req.params
        for j, tok in enumerate(d.token_ids):
            seq.token_ids.append(tok)
            if d.logprobs is not None:
                seq.logprobs.append(d.logprobs[j])
            last = j == len(d.token_ids) - 1
            if last and d.finish_reason == "stop" and not p.include_stop_str_in_output:
                break  # an EOS or stop token ends the sequence; its text is the output's only if asked for
            if req.stream or p.stop:  # otherwise the text is decoded once, when the sequence finishes
                old_len = len(seq.text)
                seq.text += seq.detok.step(tok)
                if p.stop and len(seq.token_ids) >= p.min_tokens and self._stop_string(seq, p, old_len):
                    return True
        if d.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = d.finish_reason, d.stop_reason
            if not (req.stream or p.stop):
                ids = seq.token_ids[:-1] if d.finish_reason == "stop" and not p.include_stop_str_in_output else seq.token_ids
                seq.text = seq.detok.decode_all(ids)
        return False

    @staticmethod
    def _stop_string(seq: _SeqText, p: SamplingParams, old_len: int) -> bool:
        """Finish `seq` if its text now contains a stop string (searching only where a new match can start)."""
        window_start = max(0, old_len - max(map(len, p.stop)) + 1)
        hits = [(i, s) for s in p.stop if (i := seq.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.text = seq.text[: i + len(s) if p.include_stop_str_in_output else i]
        seq.finish_reason, seq.stop_reason = "stop", s
        return True

    def _output(self, req: _RequestState, finish_time: float | None) -> RequestOutput:
        outs = []
        p = req.params
        for i, seq in enumerate(req.seqs):
            text = seq.text
            if seq.finish_reason is None and p.stop:
                # Hold back a tail that could still grow into a stop string.
                text = text[: max(seq.emitted_text_len, len(text) - max(map(len, p.stop)) + 1)]
            lps = seq.logprobs if p.logprobs is not None else None
            toks = seq.token_ids  # shared, not copied: _apply only appends to them (CompletionOutput)
            outs.append(CompletionOutput(
                index=i, text=text, num_tokens=len(toks), all_token_ids=toks, all_logprobs=lps,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, delta_text=text[seq.emitted_text_len :],
                delta_token_ids=toks[seq.emitted_tokens :], delta_logprobs=None if lps is None else lps[seq.emitted_tokens :],
            ))
            seq.emitted_text_len, seq.emitted_tokens = len(text), len(toks)
        metrics = RequestMetrics(req.arrival_time, req.first_token_time, finish_time, req.num_cached_tokens,
                                 req.num_drafts, req.draft_tokens, req.accepted_draft_tokens)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finish_time is not None, metrics,
                             req.prompt_logprobs)
