"""The engine loop: admit requests, schedule a step, run it, apply sampled tokens, report outputs.

Single-threaded by design; the HTTP server drives it from one thread and talks to it through queues.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, replace

from slipstream import loader
from slipstream.config import EngineConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.detokenizer import IncrementalDetokenizer
from slipstream.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from slipstream.engine.radix_cache import RadixCache
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Request, Sequence
from slipstream.model_runner import ModelRunner, SampledToken
from slipstream.sampling_params import SamplingParams


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        loaded = loader.load(config.model, config.load_format, config.tokenizer)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        max_len = config.scheduler.max_model_len or mc.max_position_embeddings
        if max_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_len}")
        if config.scheduler.max_num_batched_tokens < 1 or config.scheduler.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config = replace(config, scheduler=replace(config.scheduler, max_model_len=max_len))
        self.max_model_len = max_len
        self.eos_ids = self._eos_ids(loaded.path)
        self.runner = ModelRunner(config, loaded, max_len, self.eos_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        if config.cache.enable_prefix_caching:
            self.block_manager.prefix_cache = RadixCache(self.block_manager)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.stats = EngineStats()

    def _eos_ids(self, path: str) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_cfg = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_cfg):
            with open(gen_cfg) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    # ---- admission ----
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; max_model_len is {self.max_model_len}, leaving no room to generate")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds max_model_len="
                f"{self.max_model_len}; max_tokens must be <= {self.max_model_len - n}"
            )

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0,
        stream: bool = True,
    ) -> Request:
        """Validate and queue a request. Raises ValueError (bad input) or EngineOverloaded; queues nothing then."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) + params.n > self.config.scheduler.max_waiting:
            raise EngineOverloaded(f"{len(self.scheduler.waiting)} sequences already waiting")
        req = Request(request_id, prompt_ids, params, prompt if isinstance(prompt, str) else None, priority, stream)
        for i in range(params.n):
            seed = self._rng.getrandbits(62) if params.seed is None else params.seed + i * 1_000_003
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), req, i, list(prompt_ids), seed, detok)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats.prompt_tokens += len(prompt_ids)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        req.finish_time = time.monotonic()
        return self._output(req)

    def warm_up(self) -> None:
        """Run every step shape once (prefill chunk, mixed prefill + decode, decode; greedy and sampled) so that
        kernel compilation and autotuning happen now, not inside the first requests."""
        vocab = self.model_config.vocab_size
        prompt = [i % vocab for i in range(1, 2 * self.config.cache.block_size + 3)]
        self.add_request("__warmup_greedy", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), stream=False)
        self.step()
        # One at a time: a batch samples through one path, and each path has its own kernels. The last prompt is
        # short: chunks of at most 64 tokens prefill with their own (smaller) tiles, a kernel variant of their own.
        for name, tokens, params in (
            ("sampled", prompt[::-1], SamplingParams(temperature=0.7, max_tokens=4, ignore_eos=True, seed=0)),
            ("top_p", prompt[1::4], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4, ignore_eos=True, seed=0)),
        ):
            self.add_request(f"__warmup_{name}", tokens, params, stream=False)
            while self.has_unfinished():
                self.step()
        if self.block_manager.prefix_cache is not None:
            self.block_manager.prefix_cache.clear()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.stats.num_preemptions += batch.num_preempted
        if not batch.seqs:
            return []
        # With nobody waiting, the next step is most likely the same decodes: let the runner start it early.
        sampled = self.runner.execute(batch, run_ahead=not self.scheduler.waiting)
        cache = self.block_manager.prefix_cache
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if cache is not None and seq.num_computed_tokens <= seq.num_prompt_tokens:
                cache.insert(seq)  # share prompt pages with requests that arrive while this one still runs
        self.stats.steps += 1
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for seq, tok in sampled:
            self._append(seq, tok, now)
            touched[seq.request.request_id] = seq.request
        outputs = []
        for req in touched.values():
            if req.is_finished:
                req.finish_time = now
                del self.requests[req.request_id]
                outputs.append(self._output(req))
            elif req.stream:
                outputs.append(self._output(req))
        return outputs

    def _append(self, seq: Sequence, st: SampledToken, now: float) -> None:
        req, p = seq.request, seq.params
        if req.first_token_time is None:
            req.first_token_time = now
        seq.token_ids.append(st.token)
        self.stats.generation_tokens += 1
        if st.logprobs is not None:
            seq.logprobs.append(st.logprobs)
        n_out = seq.num_output_tokens
        may_stop = n_out >= p.min_tokens
        if may_stop and not p.ignore_eos and st.token in self.eos_ids:
            return self._finish(seq, "stop", None)
        if may_stop and st.token in p.stop_token_ids:
            return self._finish(seq, "stop", st.token)
        if req.stream or p.stop:  # otherwise the text is decoded once, when the sequence finishes
            old_len = len(seq.output_text)
            seq.output_text += seq.detok.step(st.token)
            if may_stop and p.stop and self._stop_string(seq, old_len):
                return
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len - seq.num_prompt_tokens
        if n_out >= max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _stop_string(self, seq: Sequence, old_len: int) -> bool:
        """Finish `seq` if its text now contains a stop string (searching only where a new match can start)."""
        p = seq.params
        window_start = max(0, old_len - max(map(len, p.stop)) + 1)
        hits = [(i, s) for s in p.stop if (i := seq.output_text.find(s, window_start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.output_text = seq.output_text[: i + len(s) if p.include_stop_str_in_output else i]
        self._finish(seq, "stop", s)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if not (seq.request.stream or seq.params.stop):
            ids = seq.output_token_ids
            if reason == "stop":  # an EOS or stop token ends the sequence but is not part of its text
                ids = ids[:-1]
            seq.output_text = seq.detok.decode_all(ids)
        self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.output_text
            if not seq.is_finished and seq.params.stop:
                # Hold back a tail that could still grow into a stop string.
                text = text[: max(seq.emitted_text_len, len(text) - max(map(len, seq.params.stop)) + 1)]
            lps = seq.logprobs if seq.params.logprobs is not None else None
            toks = seq.output_token_ids
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=toks,
                    logprobs=lps,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=text[seq.emitted_text_len :],
                    delta_token_ids=toks[seq.emitted_tokens :],
                    delta_logprobs=None if lps is None else lps[seq.emitted_tokens :],
                )
            )
            seq.emitted_text_len, seq.emitted_tokens = len(text), len(toks)
        metrics = RequestMetrics(req.arrival_time, req.first_token_time, req.finish_time, max((s.num_cached_tokens for s in req.seqs), default=0))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.is_finished, metrics)


@dataclass
class EngineStats:
    """Counters the server exports as metrics."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
