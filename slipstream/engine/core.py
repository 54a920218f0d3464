"""The engine core: admit token-id requests, schedule a step, run it, apply the sampled tokens.

It deals in token ids only (no text, no detokenization): each step returns one `SeqDelta` per sequence that
made progress. That keeps it cheap to run in its own process (`slipstream serve`), where it is a busy loop
that never formats HTTP, and lets the offline `LLM` run the same core in-process.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from slipstream import loader
from slipstream.config import EngineConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.core_stats import CoreStats
from slipstream.engine.input_processor import EngineLimits, EngineOverloaded
from slipstream.engine.outputs import SeqDelta
from slipstream.engine.proposer import DraftHeadProposer, DraftModelProposer, NgramProposer
from slipstream.engine.radix_cache import PrefixCacheStats, RadixCache
from slipstream.engine.scheduler import ScheduledBatch, Scheduler
from slipstream.engine.sequence import Request, Sequence, SeqStatus
from slipstream.engine.speculation import DraftPolicy
from slipstream.runner.batch import PromptScoring, SamplingRow, SeqResult, SeqStep, Step
from slipstream.sampling_params import SamplingParams, StructuredOutputs

log = logging.getLogger(__name__)
_SEED_SPACE = 1 << 63  # seeds are int64 in the sampling kernels


class EngineCore:
    def __init__(self, config: EngineConfig, on_stuck: Callable[[str], None] | None = None) -> None:
        """`on_stuck(why)`: what to do, from another thread, when a tensor-parallel rank of this host died and this one
        waits for it (parallel/workers.py); the engine-core process exits."""
        # The runner (torch, the GPU) is imported here, not at module level: the scheduler side stays torch-free.
        from slipstream.attention.registry import resolve_backend
        from slipstream.runner.device import resolve_device
        from slipstream.runner.model_runner import ModelRunner

        # an unusable device, or a backend that cannot run on it or with these pages, is reported before loading
        device = resolve_device(config.device)
        backend = resolve_backend(config.attention_backend, device.type)
        backend.check_runtime(device.type, None if config.dtype == "auto" else config.dtype)
        backend.check_block_size(config.cache.block_size)
        started = time.perf_counter()
        log.info("loading %s", config.model or "the embedded SmolLM2-135M-Instruct")
        loaded = loader.load(config.model, config.load_format, config.tokenizer)
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        max_len = config.scheduler.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:  # the rotary table (and the model's training) ends there
            raise ValueError(f"max_model_len {max_len} is more than the {mc.max_position_embeddings} positions this "
                             "model has: give at most that")
        self.config = config = replace(config, scheduler=replace(config.scheduler, max_model_len=max_len))
        self.max_model_len = max_len
        self.eos_ids = self._eos_ids(loaded.path)
        draft = self._load_draft() if config.speculative_method == "draft" else None
        head = (self._load_eagle3() if config.speculative_method == "eagle3"
                else self._mtp_head(loaded) if config.speculative_method == "mtp" else None)
        if config.tensor_parallel_size > 1:  # ranks 1.. in processes of their own; this one is rank 0
            from slipstream.parallel.workers import start

            self.runner = start(config, mc, loaded.weights, max_len, self.eos_ids, on_stuck)
        elif head is not None:
            from slipstream.runner.draft_head import DraftHeadRunner, head_footprint

            self.runner = ModelRunner(config, mc, loaded.weights, max_len, self.eos_ids,
                                      companion=head_footprint(config, head, mc), aux_layers=head.aux_layers,
                                      keep_hidden=not head.aux_layers)
            log.info("draft head: %s", head.name)
            head_runner = DraftHeadRunner(self.runner, head, config.seed)
        elif draft is None:
            self.runner = ModelRunner(config, mc, loaded.weights, max_len, self.eos_ids)
        else:
            from slipstream.runner.model_runner import footprint

            draft_config, draft_loaded = draft
            self.runner = ModelRunner(config, mc, loaded.weights, max_len, self.eos_ids,
                                      companion=footprint(draft_config, draft_loaded.config))
            draft_config = replace(draft_config, cache=replace(draft_config.cache, num_blocks=self.runner.num_blocks))
            log.info("draft model: %s", config.speculative_model)
            draft_runner = ModelRunner(draft_config, draft_loaded.config, draft_loaded.weights, max_len, self.eos_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        self.prefix_cache = (RadixCache(self.block_manager, next_token_in_kv=head is not None)
                             if config.cache.enable_prefix_caching else None)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.prefix_cache)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.stats = CoreStats()
        self._sec_per_token: float | None = None  # measured cost of a scheduled token, for the prefill budget
        # Overlap (async scheduling): launch step N + 1 before reading step N. On a CPU the "device" computes as
        # it is asked, so overlap there would only hold every output back by one step.
        # n-gram drafts overlap too: the step after a verifying one is planned as if every draft were accepted (the
        # device moves it back by the rejected ones: runner/inputs.Feed); it drafts behind it only where the last
        # verdict kept every draft (step()), looking its drafts up past the step in flight and guessing its draw
        # (_propose). Where that plan cannot hold (penalties, a grammar, min_tokens), a step that verifies drafts is
        # read before the next is scheduled (at the start of the next step()), and one that will draft for such a
        # sequence reads the step in flight first. A draft model or head keeps its own state step by step and turns
        # overlap off. A step that verifies token trees is read before the next is planned: the device cannot move a
        # step planned behind it (which drafts the verdict keeps, and where their KV goes, are the host's to say).
        k = config.num_speculative_tokens
        self.trees = config.speculative_branches > 1
        self.proposer: NgramProposer | DraftModelProposer | DraftHeadProposer | None = (
            NgramProposer(branches=config.speculative_branches) if config.speculative_method == "ngram"
            else DraftModelProposer(draft_runner) if draft is not None
            else DraftHeadProposer(head_runner, config.speculative_branches) if head is not None
            else None)
        self.draft_policy = DraftPolicy(k) if self.proposer is not None and config.speculative_adaptive else None
        self.overlap = (self.proposer is None or isinstance(self.proposer, NgramProposer)) and (
            config.async_scheduling == "on" or (config.async_scheduling == "auto" and self.runner.device.type == "cuda"))
        # drafts behind a step in flight
        self.drafts_behind = self.overlap and config.speculative_method == "ngram" and not self.trees
        self._kv_moves: list[tuple[int, int]] = []  # for the next step: accepted tree drafts' KV to their positions
        self._inflight: _InFlight | None = None
        self._last_read = 0.0  # when the last step was read (perf_counter)
        self._read: list[SeqDelta] = []  # what this step() has read so far (admission refusals, the step before)
        self.serving = threading.Lock()  # held by the loop that serves this core (engine/core_process.py)
        # Structured output: the grammar service starts with the first constrained request (it imports xgrammar).
        self._grammars: Grammars | None = None
        self._awaiting: list[tuple[Request, concurrent.futures.Future]] = []  # requests whose grammar compiles
        self._matchers: dict[int, Matcher] = {}  # seq_id -> its place in its grammar
        self._dormant: dict[int, Matcher] = {}  # seq_id -> a grammar that starts after a marker (end of reasoning)
        self._filling: concurrent.futures.Future | None = None  # masks being filled for the step in flight
        self.limits = EngineLimits(self.model_path, max_len, mc.vocab_size, config.scheduler.max_waiting, tuple(sorted(self.eos_ids)))
        log.info("ready in %.1f s", time.perf_counter() - started)

    def _load_draft(self) -> tuple[EngineConfig, loader.LoadedModel]:
        """The draft model's config (the target's, for its own checkpoint) and its weights. It must write the
        target's token ids (drafts are verified by comparing ids; its head may have fewer padding rows) and reach
        every position the target does."""
        c = self.config
        fmt = "dummy" if c.load_format == "dummy" else "auto"  # random target weights (benchmarks): a random draft too
        loaded = loader.load(c.speculative_model, fmt)
        mc, dc = self.model_config, loaded.config
        if dc.vocab_size > mc.vocab_size or len(loaded.tokenizer) != len(self.tokenizer):
            raise ValueError(f"speculative_model {c.speculative_model!r} does not share the target's token ids: "
                             f"vocabulary {dc.vocab_size} rows / {len(loaded.tokenizer)} tokens, the target's "
                             f"{mc.vocab_size} / {len(self.tokenizer)}")
        if dc.max_position_embeddings < self.max_model_len:
            raise ValueError(f"speculative_model {c.speculative_model!r} reaches {dc.max_position_embeddings} positions, "
                             f"fewer than max_model_len={self.max_model_len}: lower max_model_len to at most that")
        # (its layers run as its checkpoint holds them, its head too: the target's format is not the draft's)
        config = replace(c, model=c.speculative_model, load_format=fmt, quantization="auto", quantize_lm_head=False,
                         tokenizer=None, speculative_method="none", speculative_model=None,
                         cache=replace(c.cache, num_blocks=None, kv_cache_bytes=None))
        return config, loaded

    def _load_eagle3(self) -> HeadSpec:
        """The EAGLE-3 head named by speculative_model: its config, checked against the target, and its tensors."""
        from slipstream.config import Eagle3Config
        from slipstream.loader import head_checkpoint
        from slipstream.models.eagle3 import Eagle3Head
        from slipstream.runner.draft_head import HeadSpec

        path = self.config.speculative_model
        hf, tensors, names = head_checkpoint(path, self.config.load_format == "dummy")
        cfg = Eagle3Config.from_hf(hf)
        mc = self.model_config
        if cfg.layer.vocab_size != mc.vocab_size or cfg.target_hidden_size != mc.hidden_size:
            raise ValueError(f"speculative_model {path!r} is an EAGLE-3 head for a target of vocabulary {cfg.layer.vocab_size} "
                             f"and hidden size {cfg.target_hidden_size}; this model has {mc.vocab_size} and {mc.hidden_size}")
        aux = cfg.aux_layers_of(mc.num_layers)  # its layers exist in this target
        # rotary angles for every position the target reaches (a head trained on shorter texts drafts worse past
        # them; its drafts are verified all the same)
        layer = replace(cfg.layer, max_position_embeddings=max(cfg.layer.max_position_embeddings, self.max_model_len))
        cfg = replace(cfg, layer=layer)
        own = tensors is not None and any(n.endswith("embed_tokens.weight") for n in names)  # else the target's
        return HeadSpec(f"EAGLE-3 head {path}", lambda backend, fused: Eagle3Head(cfg, backend, fused, own_embedding=own),
                        None if tensors is None else lambda head: head.load_weights(tensors), layer, aux)

    def _mtp_head(self, loaded: loader.LoadedModel) -> HeadSpec:
        """The model's first MTP module, read from its own checkpoint, quantized as the model's layers are."""
        from slipstream.layers.quantization import method_table, resolve_quantization
        from slipstream.models.llama import LlamaForCausalLM
        from slipstream.models.mtp import MTPHead
        from slipstream.runner.draft_head import HeadSpec

        mc = self.model_config
        if mc.num_mtp_layers < 1:
            raise ValueError(f"speculative_method 'mtp' drafts with the model's own multi-token prediction module, and "
                             f"{self.config.model or 'the embedded model'} has none (its config.json names no "
                             "num_nextn_predict_layers)")
        spec = resolve_quantization(self.config.quantization, mc.quantization)
        methods = method_table(spec, LlamaForCausalLM.checkpoint_modules)
        weights = loaded.weights
        return HeadSpec(f"the model's MTP module (layer {mc.num_layers})",
                        lambda backend, fused: MTPHead(mc, backend, methods, fused),
                        None if weights is None else lambda head: head.load_weights(weights(spec.serialized, lazy=True)),
                        replace(mc, num_layers=1))  # its KV pool: one layer's

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
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0) -> Request:
        """Queue a checked request (see InputProcessor). Raises ValueError for a duplicate id, EngineOverloaded."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        waiting = len(self.scheduler.waiting) + sum(len(r.seqs) for r, _ in self._awaiting)  # grammars compiling too
        if waiting + params.n > self.config.scheduler.max_waiting:
            raise EngineOverloaded(f"{waiting} sequences already waiting")
        req = Request(request_id, prompt_ids, params, priority)
        max_total = self.max_model_len if params.max_tokens is None else min(self.max_model_len, len(prompt_ids) + params.max_tokens)
        for i in range(params.n):
            seed = self._rng.getrandbits(62) if params.seed is None else (params.seed + i * 1_000_003) % _SEED_SPACE
            req.seqs.append(Sequence(next(self._seq_ids), req, i, list(prompt_ids), seed, max_total_tokens=max_total))
        if params.structured_outputs is None:
            for seq in req.seqs:
                self.scheduler.add(seq)
        else:  # queued once its grammar has compiled (step() looks), so that a slow compile holds up no one else
            self._awaiting.append((req, self._grammar_service().compile(params.structured_outputs)))
        self.requests[request_id] = req
        self.stats.prompt_tokens += len(prompt_ids)
        return req

    def _grammar_service(self) -> Grammars:
        if self._grammars is None:
            from slipstream.grammar import Grammars
            from slipstream.runner.host_gate import HostGate

            dev = self.runner.device
            # (other tensor-parallel ranks get each mask sent whole, so they cannot read one still being written)
            gate = HostGate.for_device(dev) if self.config.tensor_parallel_size == 1 else None
            self._grammars = Grammars(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_ids),
                                     pin_memory=dev.type == "cuda", gate=gate)
        return self._grammars

    def _admit_compiled(self) -> list[SeqDelta]:
        """Queue the requests whose grammar is ready; a grammar that failed to compile aborts its request."""
        if not self.scheduler.running and not self.scheduler.waiting:  # nothing else to do: wait a little, not spin
            concurrent.futures.wait([f for _, f in self._awaiting], timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        deltas, still = [], []
        for req, fut in self._awaiting:
            if self.requests.get(req.request_id) is not req:
                continue  # aborted while it waited
            if not fut.done():
                still.append((req, fut))
                continue
            if fut.exception() is not None:
                log.error("request %s: its grammar failed to compile: %s", req.request_id, fut.exception())
                self.requests.pop(req.request_id)
                for seq in req.seqs:
                    seq.finish_reason = "abort"
                    self._release(seq)
                    deltas.append(SeqDelta(req.request_id, seq.index, [], None, "abort", None, 0))
                continue
            waits = bool(req.params.structured_outputs.start_after_ids)
            for seq in req.seqs:
                (self._dormant if waits else self._matchers)[seq.seq_id] = self._grammars.matcher(fut.result())
                self.scheduler.add(seq)
        self._awaiting = still
        return deltas

    def _fill_masks(self, owners: list[int], before: list[list[int]] | None):  # noqa: ANN202 - host bitmask or None
        """The runner calls this once the step's forward is queued (the host works while the device computes): the
        allowed tokens of each drawn row, rows named by sequence id, after the drafts drawn ahead of them. With overlap
        the step before is still unread: its tokens move the matchers these rows start from, so it is read first (its
        results are long done: the device runs it before this step's forward)."""
        if self._inflight is not None:
            self._read += self._collect()
        self._await_fill()  # (a no-op unless a launch raised after queueing its masks: its fill was never collected)
        rows = [(i, m, before[i] if before else []) for i, sid in enumerate(owners) if (m := self._matchers.get(sid)) is not None]
        if not rows:
            return None
        if before is None and self._grammars.gate is not None:
            # Filled on a thread while this one queues the draw (behind the gate) and prepares the next step; the
            # fill is awaited before the matchers move again (_collect)
            mask, self._filling = self._grammars.masks_later(len(owners), rows)
            return mask
        return self._grammars.masks(len(owners), rows)

    def _await_fill(self) -> None:
        """Wait for the masks being filled on the grammar service's thread (and raise its error)."""
        if self._filling is not None:
            filling, self._filling = self._filling, None
            filling.result()

    def abort_request(self, request_id: str) -> bool:
        """Finish every sequence of the request now and free its pages; False if it is unknown (or done)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._release(seq)
        return True

    def finish_sequence(self, request_id: str, index: int) -> None:
        """Stop one sample (its text reached a stop string, which only the output processor can see)."""
        req = self.requests.get(request_id)
        if req is None or req.seqs[index].is_finished:
            return
        req.seqs[index].finish_reason = "stop"
        self._release(req.seqs[index])
        if req.is_finished:
            del self.requests[request_id]

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel engine (a one-rank engine holds nothing to stop)."""
        self._await_fill()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def check_ranks(self) -> None:
        """Raise if a tensor-parallel rank has died (a one-rank engine has none to lose)."""
        check = getattr(self.runner, "check_ranks", None)
        if check is not None:
            check()

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    def warm_up(self) -> None:
        """On a GPU, run every step shape once (prefill chunk, mixed prefill + decode, decode; greedy and sampled) so
        that kernel compilation and autotuning happen now, not inside the first requests; on a CPU, one constrained
        request. Leaves no trace in stats."""
        vocab = self.model_config.vocab_size
        prompt = [i % vocab for i in range(1, 2 * self.config.cache.block_size + 3)]
        # The constrained request loads the grammar service (xgrammar, the tokenizer's token table) and runs the
        # masked draw: here, not while the first constrained request holds up every running stream. It is all a
        # CPU needs: it compiles nothing, and the other shapes' forwards cost a CPU server about 3 s of its start-up
        # (healthy after 13-14 s with them, 10.5 without, on 2 cores).
        word = StructuredOutputs(choice=(self._plain_word(),))
        grammar = ("grammar", prompt[1::3], SamplingParams(temperature=0.7, max_tokens=4, seed=0, structured_outputs=word))
        gpu = self.runner.device.type == "cuda"
        shapes = [grammar]
        if gpu:
            self.add_request("__warmup_greedy", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            self.step()
            # One at a time: a batch samples through one path, and each path has its own kernels. The last prompt is
            # short: chunks of at most 64 tokens prefill with their own (smaller) tiles, a kernel variant of their own.
            shapes = [("sampled", prompt[::-1], SamplingParams(temperature=0.7, max_tokens=4, ignore_eos=True, seed=0)),
                      ("top_p", prompt[1::4], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4, ignore_eos=True,
                                                             seed=0)),
                      grammar]
        for name, tokens, params in shapes:
            self.add_request(f"__warmup_{name}", tokens, params)
            while self.has_unfinished():
                self.step()
        if gpu:
            self._warm_up_on_gpu(len(prompt), word)
        self._forget_warm_up()

    def _forget_warm_up(self) -> None:
        """Drop what warm-up steps left: their cached pages and every figure they moved."""
        cache = self.prefix_cache
        if cache is not None:
            cache.clear()
            cache.stats = PrefixCacheStats()
        self.stats = CoreStats()
        self._sec_per_token = None  # warm-up steps timed compilation, not tokens
        if self.draft_policy is not None:  # (and so did the draft policy's rates)
            self.draft_policy = DraftPolicy(self.config.num_speculative_tokens)
        if isinstance(self.proposer, NgramProposer):  # (and the rates its trees are shaped by)
            self.proposer = NgramProposer(branches=self.config.speculative_branches)
        elif isinstance(self.proposer, DraftHeadProposer):
            self.proposer = DraftHeadProposer(self.proposer.runner, self.config.speculative_branches)

    def _warm_up_on_gpu(self, prompt_len: int, word: StructuredOutputs) -> None:
        """Kernel variants the steps above leave uncompiled, compiled now: a compile in the middle of serving holds up
        every stream (475 ms on the H200, the Qwen3-0.6B shape's first mixed step with short contexts).
        - A step that mixes a prefill with running decodes launches its attention eagerly (between graph pieces), and
          its decode attention takes a variant by batch size and context length (one partition or several, small or
          big tiles): one short decode beside a prefill, then as many short decodes as a step and the pool hold.
        - Prefill picks variants by the context a batch's tables span (the Hopper prefill deepens its pipeline from
          16K tokens): one prompt as long as max_model_len allows, up to 32K tokens (a few steps).
        - A large eager step of an odd token count (below).
        - The fused draw reads a grammar's mask over the model's own logits or, with logprobs or penalties, over float32
          ones: a constrained request with logprobs.
        - A prompt whose head the prefix cache holds prefills only its tail, over a longer context: a short tail and
          a long one after a cached head (docs/benchmarks.md: a repeated prompt ran slow on a fresh H100, and fast
          once Triton's disk cache held that machine's kernels)."""
        sched = self.config.scheduler
        vocab = self.model_config.vocab_size
        greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        self.add_request("__warmup_grammar_logprobs", [(5 * j + 3) % vocab for j in range(1, 9)],
                         SamplingParams(temperature=0.7, max_tokens=2, seed=0, logprobs=1, structured_outputs=word))
        while self.has_unfinished():
            self.step()
        bs = self.config.cache.block_size
        head = [(11 * j + 7) % vocab for j in range(2 * bs)]
        longest_hit = 3 * bs + 9  # the head, the long tail and the drawn token
        if (self.prefix_cache is not None and longest_hit <= self.max_model_len
                and -(-longest_hit // bs) < self.block_manager.num_blocks):
            for tail in (0, 5, bs + 7):  # the first caches the head; the others hit it
                self.add_request(f"__warmup_hit{tail}", head + [(13 * j + tail) % vocab for j in range(1, tail + 2)], greedy)
                while self.has_unfinished():
                    self.step()
        crowd = max(1, min(sched.max_num_seqs - 1, sched.max_waiting - 1, sched.max_num_batched_tokens // 8,
                           self.block_manager.num_blocks // 2))
        for n in sorted({1, crowd}):
            for i in range(n):
                self.add_request(f"__warmup_short{i}", [(7 * i + j) % vocab for j in range(1, 5)],
                                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            self.step()  # their prefills; then they decode beside a prefill no cached prefix shortens
            self.add_request("__warmup_mixed", [(3 * j + 11 * n) % vocab for j in range(prompt_len)], greedy)
            while self.has_unfinished():
                self.step()
        # A step of an odd number of tokens as large as a step gets: beyond the graph pieces (runner/cuda_graphs.py,
        # whose counts are multiples of 16) it runs eagerly, and kernels specialized on a count divisible by 16 (the
        # fused experts' pairs) compile their other variant.
        odd = sched.max_num_batched_tokens - 1 + sched.max_num_batched_tokens % 2
        if odd < self.max_model_len and -(-odd // self.config.cache.block_size) < self.block_manager.num_blocks:
            self.add_request("__warmup_odd", [(7 * j + 5) % vocab for j in range(odd)], greedy)
            while self.has_unfinished():
                self.step()
        longest = min(self.max_model_len - 8, 32768)
        if longest > prompt_len and -(-longest // self.config.cache.block_size) < self.block_manager.num_blocks:
            self.add_request("__warmup_longest", [(5 * j + 13) % vocab for j in range(longest)], greedy)
            while self.has_unfinished():
                self.step()
        # The prefill kernel's tree masks: a tree step alone (short tiles), then beside a prompt chunk. ("x y" followed
        # by two continuations: n-gram drafts make a tree; a draft head's trees, a chain until its measured rates say
        # otherwise, compile these variants when they first branch.)
        if self.trees:
            x, y = 3 % vocab, 5 % vocab
            self.add_request("__warmup_tree", [x, y, 7 % vocab, x, y, 9 % vocab, x, y],
                             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            self.step()
            self.step()
            self.add_request("__warmup_tree_mixed", [(3 * j + 1) % vocab for j in range(prompt_len)], greedy)
            while self.has_unfinished():
                self.step()

    def _plain_word(self) -> str:
        """The shortest alphanumeric word among the vocabulary's first tokens: a constraint the model can meet
        (xgrammar allows a token that starts a longer word even if nothing can finish it)."""
        words = (self.tokenizer.decode([t]) for t in range(min(self.model_config.vocab_size, 5000)))
        return min((w for w in words if w.isalnum()), key=len, default="0")

    # ---- one step ----
    def step(self) -> list[SeqDelta]:
        """Schedule and launch a step, then read the step launched before it: with overlap on, the GPU runs step N
        while the host reads step N - 1 and prepares step N + 1. Returns the deltas of the step that was read.
        A step that must be read before the next is scheduled (a penalty's history needs its draw, or it verifies
        drafts the next step cannot be planned past: see _behind) is read at the start of the next step(), not at the
        end of its own: what the caller does with the deltas returned in between (the output processor, the
        engine-core process's send) runs while it computes."""
        started = time.perf_counter()
        self._read = self._admit_compiled() if self._awaiting else []
        if self._inflight is not None and self._inflight.sync:
            self._read += self._collect()
        k, decoding = 0, len(self.scheduler.running)
        if self.proposer is not None:
            k = self.config.num_speculative_tokens
            if self.draft_policy is not None:
                k = self.draft_policy.choose(decoding)
            # Drafts follow the tokens the step in flight draws: it is read first, unless every sequence waiting on it
            # may be planned behind it and is verifying drafts there after a verdict that kept all of its last ones.
            # (Behind a rejection, or behind a plain step, the drafts would follow a guess of the draw, often wrong,
            # and a verifying step costs more than the host's work that reading first leaves the device idle for:
            # on an H100 at batch 1, 1.2-1.3 ms for 9 tokens a step against 0.7 for one, and about 0.2 ms.)
            flight = self._inflight
            if k and flight is not None and not all(self._behind(seq) and seq.all_accepted and seq.seq_id in flight.drafts
                                                    for seq in self.scheduler.running if seq.num_pending):
                self._read += self._collect()
            if k:  # (a plain step asks the proposer nothing: a pass over every sequence was 4% of the run at batch 256)
                self._propose(k)
        # drafts proposed for an earlier step stay on sequences it did not give them to: a plain step schedules none
        batch = self.scheduler.schedule(self._prefill_budget(), drafts=self.proposer is None or k > 0)
        self.stats.num_preemptions += batch.num_preempted
        if self.proposer is not None and any(batch.num_drafts):
            self._refine(batch)
        launched = self._launch(batch, k, started) if batch.seqs else None  # (a grammar's masks may read the step in flight)
        if self._inflight is not None:
            self._read += self._collect()
        self._inflight = launched
        if launched is not None and not self.overlap:
            self._read += self._collect()
        deltas, self._read = self._read, []
        return deltas

    def _propose(self, k: int) -> None:
        """Up to k drafts for every decoding sequence (the scheduler takes as many as the step's budget allows).
        Behind the step in flight (step() read it first unless every sequence waiting on it may draft behind it), the
        lookup follows the tokens that step is assumed to yield: its drafts, if the ones before them turned out as
        guessed (else none: drafts that follow a wrong guess are seldom accepted), and its draw, the first token looked
        up, which is dropped; the drafts follow it."""
        started = time.perf_counter()
        for seq in self.scheduler.running:
            seq.draft_token_ids = []
            # no drafts before a dormant grammar starts: draws after its marker in the same step would go unmasked
            if seq.num_tokens - seq.num_computed_tokens != 1 or seq.seq_id in self._dormant:
                continue
            # drafts and the token after them must fit under the sequence's length limit
            limit = min(k, seq.max_total_tokens - seq.num_tokens - 1)
            ids = seq.token_ids
            if self.trees and isinstance(self.proposer, NgramProposer):  # (read first: nothing pending)
                seq.draft_token_ids, seq.draft_parents = self.proposer.propose_tree(seq.seq_id, ids, limit)
            elif not seq.num_pending:
                seq.draft_token_ids = self.proposer.propose(seq.seq_id, ids, limit)
                seq.drafts_follow = (len(ids), ids[-1])
            else:
                if seq.drafts_follow == (len(ids), ids[-1]):
                    ids = ids + self._inflight.drafts[seq.seq_id]
                guess = self.proposer.propose(seq.seq_id, ids, limit + 1, len(seq.token_ids))
                if guess:
                    seq.draft_token_ids, seq.drafts_follow = guess[1:], (len(ids) + 1, guess[0])
        self.stats.draft_seconds += time.perf_counter() - started

    def _behind(self, seq: Sequence) -> bool:
        """Whether a step of `seq` may be planned behind one of its steps whose drafts are not counted yet (the device
        moves its positions and output indices; runner/inputs.Feed): not where the host reads what the drafts change
        (a penalty's history, a grammar's state, whether min_tokens still bans the end)."""
        p = seq.params
        return (self.drafts_behind and not p.needs_penalties and seq.seq_id not in self._matchers
                and seq.seq_id not in self._dormant and len(seq.token_ids) - seq.num_prompt_tokens >= p.min_tokens)

    def _refine(self, batch: ScheduledBatch) -> None:
        """Let the proposer draft for the scheduled sequences, within the step's prefill budget (a draft model
        catching up over a long prompt computes at most that many tokens a step); a sequence that got fewer drafts
        than the scheduler reserved computes that many fewer tokens (the spare slots serve its next tokens)."""
        started = time.perf_counter()
        self.proposer.refine(list(zip(batch.seqs, batch.num_drafts)),
                             self._prefill_budget() or self.config.scheduler.max_num_batched_tokens)
        self.stats.draft_seconds += time.perf_counter() - started
        for i, (seq, planned) in enumerate(zip(batch.seqs, batch.num_drafts)):
            n = len(seq.draft_token_ids) if planned else 0
            if n < planned:
                batch.num_new_tokens[i] -= planned - n
                batch.num_drafts[i] = n

    def _launch(self, batch: ScheduledBatch, k: int, step_started: float) -> _InFlight:
        step = Step([self._seq_step(*item) for item in zip(batch.seqs, batch.num_new_tokens, batch.num_drafts)],
                    self._kv_moves)
        self._kv_moves = []
        # Penalties: the history uploaded with the next step must hold the token this one draws. Drafts: the next step
        # is planned as if all were accepted, where the plan can hold (_behind). (Grammars need this step's draws
        # too, but only once the next step's forward is queued: _fill_masks reads the step in flight then.)
        sync = any(s.sampling is not None and s.sampling.history is not None for s in step.seqs) or any(
            d and not self._behind(seq) for seq, d in zip(batch.seqs, batch.num_drafts))
        drafts_in_flight = {}
        cache = self.prefix_cache
        for seq, n, drafts, s in zip(batch.seqs, batch.num_new_tokens, batch.num_drafts, step.seqs):
            # Counted as computed now, before the launch reads the step in flight (their KV is written before
            # anything later on the device reads it); drafts as if all were accepted, until their verdict is read.
            seq.num_computed_tokens += n
            if s.sampling is not None:
                seq.num_pending += 1 + drafts
            if drafts:
                drafts_in_flight[seq.seq_id] = seq.draft_token_ids[:drafts]
            if cache is not None and seq.num_computed_tokens <= seq.num_prompt_tokens:
                cache.insert(seq)  # share prompt pages with requests that arrive while this one still runs
        self.stats.steps += 1
        started = time.perf_counter()  # before the launch: on a CPU the launch itself computes the step
        masks = self._fill_masks if self._matchers or self._dormant else None  # a dormant one may wake as it reads
        # launched as plain decoding would launch it: behind another step (its host work hidden), or with no overlap to
        # lose (an engine that never overlaps; a step read before the next is scheduled anyway: penalties)
        steady = not self.overlap or self._inflight is not None or sync
        return _InFlight(batch, self.runner.launch(step, masks), started, sync, k, step_started, steady, drafts_in_flight)

    def _seq_step(self, seq: Sequence, n: int, drafts: int) -> SeqStep:
        start = seq.num_computed_tokens
        known = len(seq.token_ids)
        if start >= known:  # a decode of the token the step in flight is drawing, and drafts to follow it
            ids, fed = [0] + seq.draft_token_ids[:drafts], True
        else:
            ids, fed = seq.token_ids[start : start + n - drafts] + seq.draft_token_ids[:drafts], False
        sampling = None
        p = seq.params
        if start + n - drafts == seq.num_tokens:  # the step reaches the sequence's last token: draw the next
            sampling = SamplingRow(p, seq.seed, seq.num_output_tokens,
                                   list(seq.token_ids) if p.needs_penalties else None, seq.num_prompt_tokens)
        score = None
        if p.prompt_logprobs is not None and seq.index == 0:  # the n samples share one prompt: the first scores it
            # position q's hidden state scores prompt token q + 1; positions scored before a preemption are not again
            lo, hi = max(start, seq.num_prompt_scored), min(start + n - drafts, seq.num_prompt_tokens - 1)
            if lo < hi:
                score = PromptScoring(lo - start, seq.token_ids[lo + 1 : hi + 1], p.prompt_logprobs)
                seq.num_prompt_scored = hi
        parents = seq.draft_parents[:drafts] if drafts and seq.draft_parents is not None else None
        if parents is not None and all(p == i - 1 for i, p in enumerate(parents)):
            parents = None  # a tree that is one chain verifies as one (in the CUDA graphs of 1 + k tokens)
        return SeqStep(seq.seq_id, ids, start, seq.block_table, drafts, sampling, fed, score, parents)

    def _collect(self) -> list[SeqDelta]:
        """Read the step in flight and append what it drew (finished or aborted sequences drop theirs). Drafts past
        a rejection had their KV computed for nothing: their slots are overwritten later and whole pages go back."""
        self._await_fill()  # (the step's draw waits on the device for its masks; the matchers move below)
        flight, self._inflight = self._inflight, None
        results = self.runner.collect(flight.launched)
        stats, batch = self.stats, flight.batch
        generated = stats.generation_tokens
        tokens = batch.num_tokens
        self._measure(tokens, time.perf_counter() - flight.started)
        if batch.carries_prompt:
            stats.mixed_steps += 1
            stats.mixed_device_seconds += flight.launched.device_seconds
        else:
            stats.decode_steps += 1
            stats.decode_device_seconds += flight.launched.device_seconds
        by_id = {seq.seq_id: (seq, drafts) for seq, drafts in zip(flight.batch.seqs, flight.batch.num_drafts)}
        # for the proposer: each sequence's pages (one that ends below gives them up)
        tables = [seq.block_table for seq in batch.seqs] if self.proposer is not None else []
        for seq_id, scores in flight.launched.prompt_scores.items():  # sent with the sequence's first token
            by_id[seq_id][0].prompt_scores += scores
        deltas = []
        for r in results:
            seq, drafts = by_id[r.seq_id]
            seq.num_pending -= 1 + drafts
            if seq.is_finished:
                continue
            if drafts:
                if seq.status is SeqStatus.RUNNING:  # (a sequence preempted since has none computed)
                    if r.path is not None:
                        self._kv_moves += tree_moves(seq.block_table, self.config.cache.block_size,
                                                     seq.num_computed_tokens - drafts - 1, r.path)
                    seq.num_computed_tokens -= drafts - (len(r.tokens) - 1)
                seq.all_accepted = len(r.tokens) - 1 == drafts
                self.stats.draft_tokens += drafts
                self.stats.accepted_draft_tokens += len(r.tokens) - 1
                self.stats.drafts += 1
                if self.proposer is not None:  # (tests hand out drafts themselves)
                    self.proposer.accepted(seq.seq_id, len(r.tokens) - 1, r.path)
            delta = self._append(seq, r)
            if drafts:
                delta.draft_tokens, delta.accepted_draft_tokens = drafts, len(r.tokens) - 1
            deltas.append(delta)
            if seq.is_finished:
                if seq.request.is_finished:
                    self.requests.pop(seq.request.request_id, None)
            elif drafts:
                self.block_manager.trim(seq, seq.num_tokens)
        if self.proposer is not None:  # ended ones too: their pages may stay in the prefix cache
            started = time.perf_counter()
            self.proposer.observe(list(zip(batch.seqs, tables)))
            policy = self.draft_policy
            if policy is not None and isinstance(self.proposer, NgramProposer) and policy.wants_guesses(len(batch.seqs)):
                policy.record_guesses(len(batch.seqs), *self.proposer.first_guesses(
                    [seq for seq in batch.seqs if not seq.is_finished]))  # (an ended one's index is gone)
            self.stats.draft_seconds += time.perf_counter() - started
        # A decode step (no prompt tokens) measured for the draft policy: its tokens over the time since the step
        # read before it, or since the step() that launched it began if later (drafting and scheduling count). With
        # overlap a step launched in one step() is read in the next: that interval is what a step costs then.
        now = time.perf_counter()
        if self.draft_policy is not None and batch.seqs and not batch.carries_prompt:
            self.draft_policy.record(len(batch.seqs), flight.k, stats.generation_tokens - generated,
                                     now - max(self._last_read, flight.step_started), flight.steady)
        self._last_read = now
        return deltas

    def _prefill_budget(self) -> int | None:
        stall = self.config.scheduler.max_decode_stall
        if not stall or self._sec_per_token is None:
            return None
        return max(self.config.cache.block_size, int(stall / self._sec_per_token))

    def _measure(self, num_tokens: int, seconds: float) -> None:
        """Track the cost of a token in prefill-sized steps (small steps are dominated by fixed costs)."""
        if num_tokens >= 2 * self.config.cache.block_size:
            rate = seconds / num_tokens
            self._sec_per_token = rate if self._sec_per_token is None else 0.8 * self._sec_per_token + 0.2 * rate

    def _append(self, seq: Sequence, r: SeqResult) -> SeqDelta:
        """Append the accepted tokens one by one, stopping at the first that ends the sequence."""
        p = seq.params
        ids = seq.token_ids
        min_len = seq.num_prompt_tokens + p.min_tokens
        matcher = self._matchers.get(seq.seq_id)
        taken = 0
        for token in r.tokens:
            ids.append(token)
            taken += 1
            if matcher is None and seq.seq_id in self._dormant:
                self._wake(seq)  # the grammar starts with the next draw if this token completed its marker
            if matcher is not None and not matcher.advance(token):
                # only a mask nothing survives can draw outside the grammar (a vocabulary where a token that starts a
                # word has no continuation): end the sequence rather than emit text that breaks the constraint
                log.warning("sequence %d drew token %d outside its grammar; stopping it", seq.seq_id, token)
                ids.pop()
                taken -= 1
                self._finish(seq, "abort", None)
            elif matcher is not None and matcher.done:  # the output is complete and took its stop token
                self._finish(seq, "stop", None if token in self.eos_ids else token)
            elif len(ids) >= min_len and token in self.eos_ids and not p.ignore_eos:
                self._finish(seq, "stop", None)
            elif len(ids) >= min_len and token in p.stop_token_ids:
                self._finish(seq, "stop", token)
            elif len(ids) >= seq.max_total_tokens:
                self._finish(seq, "length", None)
            else:
                continue
            break
        self.stats.generation_tokens += taken
        tokens = r.tokens if taken == len(r.tokens) else r.tokens[:taken]
        lps = None if r.logprobs is None else r.logprobs[:taken]
        prompt_lps = None
        if seq.params.prompt_logprobs is not None and seq.index == 0 and len(ids) - taken == seq.num_prompt_tokens:
            prompt_lps, seq.prompt_scores = seq.prompt_scores, []
        return SeqDelta(seq.request.request_id, seq.index, tokens, lps, seq.finish_reason, seq.stop_reason,
                        seq.num_cached_tokens, prompt_lps)

    def _wake(self, seq: Sequence) -> None:
        after = seq.params.structured_outputs.start_after_ids
        ids = seq.token_ids
        if len(ids) - seq.num_prompt_tokens >= len(after) and tuple(ids[len(ids) - len(after) :]) == after:
            self._matchers[seq.seq_id] = self._dormant.pop(seq.seq_id)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        # Stopped inside a run of accepted drafts, or with a step in flight (its drafts counted as computed until read):
        # KV past the kept tokens must not reach the prefix cache.
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids) - 1)
        self.scheduler.finish(seq)
        self._matchers.pop(seq.seq_id, None)
        self._dormant.pop(seq.seq_id, None)
        if self.proposer is not None:
            self.proposer.forget(seq.seq_id)

    def snapshot(self) -> CoreStats:
        """The counters plus the queue and pool gauges, as of now."""
        s, bm = self.stats, self.block_manager
        s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.free_blocks, s.total_blocks = bm.num_free_blocks, bm.num_blocks
        cache = self.prefix_cache
        if cache is not None:
            s.cache_query_tokens, s.cache_hit_tokens = cache.stats.query_tokens, cache.stats.hit_tokens
            s.cache_evicted_blocks, s.cache_blocks = cache.stats.evicted_blocks, len(cache.nodes)
        return s



def tree_moves(table: list[int], block_size: int, last: int, path: list[int]) -> list[tuple[int, int]]:
    """(from slot, to slot) of the KV of a token tree's accepted drafts (`path`, by index): draft i was written at
    position last + 1 + i (`last`: the token before the drafts) and now stands at last + its depth."""
    def slot(p: int) -> int:
        return table[p // block_size] * block_size + p % block_size

    return [(slot(last + 1 + i), slot(last + d)) for d, i in enumerate(path, 1) if i + 1 != d]


@dataclass
class _InFlight:
    batch: ScheduledBatch
    launched: Launched
    started: float
    sync: bool  # read it before scheduling the next step
    k: int  # the drafts per sequence the draft policy chose for it
    step_started: float  # when the step() that launched it began (drafting and scheduling are its cost too)
    steady: bool  # launched as plain decoding launches its steps (behind another, or with no overlap to lose)
    drafts: dict[int, list[int]]  # the drafts it verifies, by sequence id


if TYPE_CHECKING:
    from slipstream.grammar import Grammars, Matcher
    from slipstream.runner.draft_head import HeadSpec
    from slipstream.runner.model_runner import Launched
