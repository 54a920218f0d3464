"""Model runner: orchestrates the rooms of runner/ for one step at a time.

A `Step` (plain data) in; the forward runs through a CUDA graph when every sequence computes the same number
of tokens and a ladder was captured for it, through graphs of the pieces between the attention calls when the step
is not too large, eagerly otherwise; then the rows to draw become logits and tokens.
For a sequence that verifies k drafts, the k + 1 rows are drawn with the request's own sampling rule and the
drafts are accepted while they equal the draws: for drafts proposed deterministically (n-gram lookup) this is
exactly speculative sampling's rule, so the output distribution is that of plain decoding.

A step is launched (`launch`: inputs staged, forward, draw, results copied to pinned host memory, all queued
on the device) and its results read later (`collect`). The engine core launches step N + 1 before it collects
step N, so the GPU never waits for the host's bookkeeping: a sequence that drew a token in step N is fed it in
step N + 1 straight from the device (`SeqStep.feed_previous`), and only `collect` waits for the GPU. A step behind
one that verifies drafts is planned as if every draft were accepted; the device counts the accepted ones and moves
the positions of what follows back by the rest (`inputs.Feed`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from slipstream import kernels
from slipstream.attention.registry import create_backend, resolve_backend
from slipstream.config import EngineConfig, ModelConfig
from slipstream.layers.linear import finish_loading
from slipstream.layers.quantization import method_table, resolve_quantization
from slipstream.layers.sampler import SamplerOutput, sample
from slipstream.loader.dummy import init_dummy_weights
from slipstream.models import model_class
from slipstream.parallel.shard import Shard
from slipstream.runner.batch import PromptScore, SeqResult, SeqStep, Step, walk_tree
from slipstream.runner.cuda_graphs import CapturePool, GraphLadder, PiecewiseLadder
from slipstream.runner.device import capability, dtype_name, resolve_device, resolve_dtype
from slipstream.runner.inputs import Feed, HostInputs, Moved, Stager, eager_inputs, front_padded, host_inputs
from slipstream.runner.kv_pool import KVPool
from slipstream.runner.sampling import SamplingTensors, expand_rows

# (row owners' sequence ids, drafts before each row or None) -> the rows' allowed tokens (grammar.Bitmask) or None
MaskFiller = Callable[[list[int], "list[list[int]] | None"], Any]

log = logging.getLogger(__name__)
# Decode batches up to this size replay whole-forward CUDA graphs (a ladder in steps of 16: 36 graphs; vLLM also stops
# at 512 by default); larger ones replay graph pieces (below).
MAX_GRAPH_SEQS = 512
# Other steps (prompt chunks beside decodes, drafts of several lengths) up to this many tokens replay the forward in
# pieces between the layers' attention calls (cuda_graphs.PiecewiseLadder); beyond it a step's arithmetic outweighs
# launching it from Python.
MAX_PIECEWISE_TOKENS = 2048
# A step of drafts of several lengths (decodes beside them) up to this many tokens once padded is padded to the verifying
# ladder's 1 + k tokens a sequence (inputs.front_padded) and replays one graph: below a few hundred rows a GEMM's time
# is its weights' bytes, so the padding rows cost little, where the pieces launch the attention from Python in every
# layer. (A 135M model's speculative steps at batch 16 took about 10 ms where plain ones took 2: H100, lease AK; what
# share of that the pieces were was not profiled, nor is this bound measured yet.)
PAD_TO_GRAPH_TOKENS = 256
# prompt_logprobs: rows of logits at a time, within what the memory profile allowed for (a 16-bit and a float32 block
# of 256 x 151,936 are 0.23 GB)
_SCORE_ROWS = 256

WeightSource = Callable[..., Iterator[tuple[str, torch.Tensor]]] | None  # (as stored?, lazy=) -> tensors; None: random


def _construct(config: EngineConfig, mc: ModelConfig, backend: object, fused: bool, device: torch.device,
               dtype: torch.dtype, shard: Shard | None = None) -> tuple[torch.nn.Module, object]:
    """The model with its parameters created (not loaded) on `device` ("meta": sizes only), and its quantization."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            cls = model_class(mc.architecture)
            spec = resolve_quantization(config.quantization, mc.quantization)
            cap = capability(device)
            if spec.method == "fp8" and device.type == "cuda" and cap < (8, 9):
                raise ValueError(f"FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper: FP8 "
                                 f"tensor cores); this one is {cap[0]}.{cap[1]}: use --quantization none or int4")
            if spec.rounded and device.type != "meta" and not (shard and shard.rank):
                log.info("%d GGUF projections are of kinds not kept as stored (F16, Q2_K, Q3_K, IQ...): rounded to 4 bits "
                         "as they load (%s%s)", len(spec.rounded), ", ".join(spec.rounded[:3]), ", ..." * (len(spec.rounded) > 3))
            if spec.method == "fp8" and device.type == "cpu" and not (shard and shard.rank):  # (said once, by rank 0)
                log.warning("FP8 weights on the CPU run a reference path that dequantizes every weight in every step "
                            "(several times slower than --quantization none): it is there to check FP8 quality, not for speed")
            methods = method_table(spec, cls.checkpoint_modules, config.quantize_lm_head)
            return cls(mc, backend, methods, fused=fused, shard=shard), spec
    finally:
        torch.set_default_dtype(default_dtype)


def footprint(config: EngineConfig, mc: ModelConfig) -> tuple[int, int]:
    """(weight bytes, KV bytes per page) of the model `config` would run, without loading it: what a model that
    shares another's pages (a draft model) asks that other to leave room for."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, mc, device)
    spec = resolve_backend(config.attention_backend, device.type)
    model, _ = _construct(config, mc, create_backend(spec), spec.name == "triton", torch.device("meta"), dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, KVPool(mc, config.cache.block_size, kv_dtype(config, dtype, device), device).bytes_per_block


def kv_dtype(config: EngineConfig, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's storage dtype: the compute dtype, or FP8 E4M3 (kernels/attention.py reads it with its scales)."""
    if config.cache.kv_cache_dtype != "fp8":
        return dtype
    cap = capability(device)
    if device.type == "cuda" and cap < (8, 9):
        raise ValueError(f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (FP8 conversions); this one "
                         f"is {cap[0]}.{cap[1]}")
    return torch.float8_e4m3fn


_NOT_DRAWN = "a sequence is fed a token that the previous step did not draw"  # (a scheduler bug: never a user's)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: WeightSource, max_model_len: int,
                 eos_ids: set[int], companion: tuple[int, int] = (0, 0), shard: Shard | None = None,
                 aux_layers: tuple[int, ...] = (), keep_hidden: bool = False) -> None:
        """`companion`: (weight bytes, KV bytes per page) of a model that will share this pool's page ids (a draft
        model, built after this one with as many pages): the pool leaves room for its weights and sizes its pages
        for both (see `footprint`). `shard`: this runner is one rank of a tensor-parallel model (it holds its slice
        of each layer, the KV heads of its query heads, and as many pages as every rank can). A draft head beside it
        reads the states each step keeps (`head_states`, rows by `computed`): those entering `aux_layers` (EAGLE-3),
        or with `keep_hidden` the final hidden states (MTP)."""
        self.shard = shard or Shard.single()
        self.aux_layers = aux_layers
        self.keep_hidden = keep_hidden
        # the last step's states entering aux_layers [tokens, 3 x hidden], or its final hidden states [tokens, hidden]
        self.head_states: torch.Tensor | None = None
        self.computed: dict[int, tuple[int, int, int]] = {}  # its sequences: id -> (first row, first position, tokens)
        # of the last step read, the sequences that verified a token tree: id -> the rows it kept, from its first row
        # (the token before the tree, then the kept drafts': their states, in the order of their new positions)
        self.kept_rows: dict[int, list[int]] = {}
        self.config = config
        self.model_config = mc = model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, mc, self.device)
        self.block_size = bs = config.cache.block_size
        self.max_model_len = max_model_len
        spec = resolve_backend(config.attention_backend, self.device.type)
        spec.check_runtime(self.device.type, dtype_name(self.dtype))
        spec.check_block_size(bs)
        self.backend_name = spec.name
        self.backend = create_backend(spec)
        # The Triton kernels (norms, GEMVs, RoPE, sampling) run with the Triton attention backend, on CUDA.
        self.fused = spec.name == "triton"
        # Cascade decode: prefix-cache hits put the same pages at the head of many tables; the Triton decode
        # path then reads them once per step for the whole batch.
        self.cascade = self.fused and config.cache.enable_prefix_caching
        started = time.perf_counter()
        self.model = self._build(weights)
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        log.info("weights: %.2f GB on %s in %.1f s", nbytes / 1e9, self.device, time.perf_counter() - started)
        sched = config.scheduler
        width = -(-max_model_len // bs)
        # Room for one step: per token its id, position, slot (and a token tree's mask); per drawn row (at most one a
        # token: a verifying step draws every one) its index, three sampling ints and whether a grammar holds it; per
        # sequence its block table, query start and length. A step behind a verifying one (inputs.Feed) adds per token
        # its row and owner, per drawn row the same, per sequence its k drafts and the rows of their draws and 6 more;
        # one behind a tree's verdict (never behind a chain's) per sequence at most k KV moves of 2 (each list's
        # alignment padding is covered by the +128).
        k = config.num_speculative_tokens
        self.ints = Stager(self.device, torch.int64, 12 * sched.max_num_batched_tokens
                           + sched.max_num_seqs * (width + 2 * k + 16) + 128)
        self.sampling = SamplingTensors(self.device, mc.vocab_size, sorted(eos_ids), sched.max_num_batched_tokens)
        kv_heads = self.shard.heads(mc.num_heads, mc.num_kv_heads)[3]
        self.kv = KVPool(mc, bs, kv_dtype(config, self.dtype, self.device), self.device, kv_heads)
        reserve, shared_page_bytes = companion
        self.num_blocks = self.shard.min(self.kv.size(config.cache, max_model_len, sched.max_num_seqs,
                                                      lambda: self._profile_free_bytes() - reserve, shared_page_bytes))
        self.kv.allocate(self.num_blocks, self.backend)
        log.info("KV cache: %d pages of %d tokens (%.2f GB)", self.num_blocks, bs, self.num_blocks * self.kv.bytes_per_block / 1e9)
        self.graphs: dict[int, GraphLadder] = {}
        self.pieces: PiecewiseLadder | None = None  # every other step up to MAX_PIECEWISE_TOKENS tokens
        self._graph_pool: CapturePool | None = None
        if self.device.type == "cuda" and self.fused and not config.enforce_eager:
            started = time.perf_counter()
            self.capture_graphs(1)
            # A step that verifies k drafts for every sequence computes 1 + k tokens each: a ladder of its own (fewer
            # drafts, or a mix, replay pieces). One rank only: the others would replay pieces for such a step.
            verify = 1 + config.num_speculative_tokens
            # (a token tree's step runs in pieces; one that is a chain, as trees often are, replays this ladder)
            if config.speculative_method != "none" and self.shard.world == 1 and verify <= bs:
                self.capture_graphs(verify)
            self.pieces = PiecewiseLadder(self.model, self.backend, self.ints, min(sched.max_num_batched_tokens, MAX_PIECEWISE_TOKENS),
                                          self.kv.pad_slot, self._graph_pool, self.aux_layers)
            log.info("CUDA graphs for %s, and in pieces for %d token counts up to %d, captured in %.1f s", ", ".join(
                f"{len(ladder.sizes)} batch sizes of {q} token{'s' if q > 1 else ''} a sequence"
                for q, ladder in self.graphs.items()), len(self.pieces.sizes), self.pieces.sizes[-1],
                time.perf_counter() - started)
        self.gpu_wait_s = 0.0  # host time spent blocked on the GPU (benchmarks derive the CPU share of a step)
        # The last launched step's draws, on the device: sequence id -> its first row, the tokens, and the drafts they
        # verify by sequence id.
        self._last_rows: dict[int, int] = {}
        self._last_tokens: torch.Tensor | None = None
        self._last_drafts: dict[int, list[int]] = {}
        self._feed: Feed | None = None  # what the step being launched takes from the one before
        if self.device.type == "cuda":
            self._host_tokens = [torch.empty(sched.max_num_batched_tokens, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._token_buf = 0

    def _build(self, weights: WeightSource) -> torch.nn.Module:
        model, spec = _construct(self.config, self.model_config, self.backend, self.fused, self.device, self.dtype,
                                 self.shard)
        if weights is None:
            init_dummy_weights(model, self.config.seed)
            finish_loading(model)
        elif self.shard.world > 1:  # a rank reads only its slices of the checkpoint (where the format allows)
            model.load_weights(weights(spec.serialized, lazy=True))
        else:
            model.load_weights(weights(spec.serialized))
        return model.eval()

    @property
    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block

    def capture_graphs(self, query_len: int) -> None:
        """Capture a ladder of CUDA graphs for steps whose sequences each compute `query_len` tokens (1: decodes;
        1 + k: verifying k drafts). Ladders share one memory pool."""
        if self._graph_pool is None:
            self._graph_pool = CapturePool(self.device)
        sched = self.config.scheduler
        max_seqs = min(sched.max_num_seqs, MAX_GRAPH_SEQS, sched.max_num_batched_tokens // query_len)
        self.graphs[query_len] = GraphLadder(self.model, self.ints, query_len, max_seqs, self.max_model_len, self.block_size,
                                             self.kv.pad_slot, self.num_blocks, self.cascade, self._graph_pool,
                                             self.aux_layers)

    def serve_host_threads(self) -> None:
        """Set this process up to serve (the engine-core process, after warm-up). On a GPU the host's work is
        bookkeeping and structured output's bitmasks (edits of 1-5 MB a step), which torch runs as OpenMP regions
        over a thread per core that wait for every thread: beside the front ends, the clients and xgrammar's threads
        on the same cores, a 1.5 MB fill took milliseconds (py-spy, H100 host, 256 constrained streams; one thread
        lifted that run from 0.16x to 0.70x of unconstrained throughput). One thread does them at memory speed. A
        CPU engine computes the model with its threads and keeps them."""
        if self.device.type == "cuda":
            torch.set_num_threads(1)

    def _profile_free_bytes(self) -> int:
        """Run the largest step once (no KV pool yet) to measure peak activation memory, then budget the rest."""
        sched = self.config.scheduler
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = sched.max_num_batched_tokens
        # the step as the scheduler could fill it: sequences of at most max_model_len tokens (positions past it
        # would index beyond the rotary table), each on whole pages of its own
        lens = [min(self.max_model_len, tokens - i) for i in range(0, tokens, self.max_model_len)]
        bs = self.block_size
        tables, slots, positions, nblk = [], [], [], 0
        for n in lens:
            pages = -(-n // bs)
            tables.append(list(range(nblk, nblk + pages)))
            slots += range(nblk * bs, nblk * bs + n)
            positions += range(n)
            nblk += pages
        scratch = self.kv.bind_scratch(nblk, self.backend)
        ids = torch.randint(0, self.model_config.vocab_size, (tokens,)).tolist()
        firsts = [sum(lens[:i]) for i in range(len(lens))]
        with torch.inference_mode():
            self.ints.reset()
            h = HostInputs(ids, positions, slots, lens, lens, tables, [], firsts, 0, 0)
            hidden = self.model(*eager_inputs(h, self.ints), self.aux_layers)
            if self.aux_layers:  # (and the states an EAGLE-3 head reads)
                hidden = hidden[0]
            # the most rows a step draws: one per sequence, 1 + k when verifying k drafts each
            per_seq = 1 + self.config.num_speculative_tokens if self.config.speculative_method != "none" else 1
            logits = self.model.compute_logits(hidden[: min(tokens, sched.max_num_seqs * per_seq)])
            del hidden
            probs = torch.softmax(logits.float(), -1)
            probs.sort(dim=-1, descending=True)
            del logits, probs
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch
        self.backend.bind_kv([], [])  # frees the scratch pages
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free = int(total * self.config.cache.gpu_memory_utilization) - peak
        if free <= 0:
            raise ValueError(f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f})")
        return free

    # ---- one step ----
    @torch.inference_mode()
    def compute_logits(self, step: Step) -> tuple[list[SeqStep], torch.Tensor | None, dict[int, list[PromptScore]]]:
        """Queue the step's forward: (its sequences in run order, the logits of the rows they draw, in that order:
        one per drawing sequence, k + 1 after k drafts; the prompt scores of the sequences that ask, by id)."""
        seqs = sorted(step.seqs, key=lambda s: len(s.token_ids) != 1)  # one-token sequences first: decode kernel
        self.ints.reset()
        if step.kv_moves:  # (queued before the forward, which may read the moved KV or write where it was)
            src, dst = self.ints.put([a for a, _ in step.kv_moves]), self.ints.put([b for _, b in step.kv_moves])
            self.ints.upload()
            self.backend.move_kv(src(), dst())
        h = self._graph_shaped(host_inputs(seqs, self.block_size, self.cascade))
        self._feed = self._feeder(seqs, h)
        out = self._forward(h, self._feed)
        if self.aux_layers:
            out, self.head_states = out
        elif self.keep_hidden:
            self.head_states = out
        if self.aux_layers or self.keep_hidden:
            self.computed = {s.seq_id: (row, s.start, len(s.token_ids)) for s, row in zip(seqs, h.first_rows)}
            self.kept_rows = {}  # (this step's trees', once it is read)
        scores = self._score_prompts(seqs, h.first_rows, out) if any(s.score is not None for s in seqs) else {}
        hidden = self._take(out, h.sample_rows)
        return seqs, self.model.compute_logits(hidden) if h.sample_rows else None, scores

    @torch.inference_mode()
    def teacher_states(self, tokens: list[int], aux_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole sequence through the model outside any engine step (training a draft head on the model's own
        predictions): (the most likely next token at each position, the states entering `aux_layers` [n, 3 x hidden]).
        It writes the first pages of the pool: nothing else may be running, and nothing cached may be kept."""
        if len(tokens) > min(self.max_model_len, self.config.scheduler.max_num_batched_tokens, self.num_blocks * self.block_size):
            raise ValueError(f"{len(tokens)} tokens are more than one step of this engine computes")
        self.ints.reset()
        h = host_inputs([SeqStep(-1, tokens, 0, list(range(-(-len(tokens) // self.block_size))))], self.block_size, False)
        hidden, aux = self.model(*eager_inputs(h, self.ints), aux_layers)
        best = torch.cat([self.model.compute_logits(hidden[i : i + _SCORE_ROWS]).argmax(dim=-1)
                          for i in range(0, len(tokens), _SCORE_ROWS)])
        return best, aux

    def _score_prompts(self, seqs: list[SeqStep], first_rows: list[int], hidden: torch.Tensor) -> dict[int, list[PromptScore]]:
        """prompt_logprobs: each scored position's log-softmax, read now (a host sync: only steps that score pay
        it), a slice of rows at a time so that a long prompt's [rows, vocab] float32 block stays bounded."""
        rows: list[int] = []
        targets: list[int] = []
        owners: list[SeqStep] = []
        for s, first in zip(seqs, first_rows):
            if s.score is not None:
                rows += range(first + s.score.offset, first + s.score.offset + len(s.score.targets))
                targets += s.score.targets
                owners += [s] * len(s.score.targets)
        k = max(s.score.top for s in owners)
        scores: dict[int, list[PromptScore]] = {}
        for i in range(0, len(rows), _SCORE_ROWS):
            idx = torch.tensor(rows[i : i + _SCORE_ROWS], device=hidden.device)
            tgt = torch.tensor(targets[i : i + _SCORE_ROWS], device=hidden.device)
            logp = torch.log_softmax(self.model.compute_logits(hidden[idx]), dim=-1, dtype=torch.float32)
            if self.shard.rank:  # only rank 0's results are read (parallel/workers.py); the others join the gather
                continue
            chosen = logp.gather(1, tgt.unsqueeze(1))
            ranks = ((logp > chosen).sum(dim=1) + 1).tolist()
            top_lp, top_ids = logp.topk(k, dim=-1)  # k = 0: empty rows
            for j, (rank, t, lp, ids, lps) in enumerate(zip(ranks, targets[i:], chosen.squeeze(1).tolist(),
                                                            top_ids.tolist(), top_lp.tolist())):
                s = owners[i + j]
                entry = {t: lp}
                for tok, v in zip(ids[: s.score.top], lps[: s.score.top]):
                    entry.setdefault(tok, v)
                scores.setdefault(s.seq_id, []).append((rank, entry))
        return scores

    def _feeder(self, seqs: list[SeqStep], h: HostInputs) -> Feed | None:
        """What the step's inputs take from the previous step's results, still on the device (see `Feed`)."""
        last = self._last_rows
        if not self._last_drafts:  # (the common step: no draft moves anything; no loop over every sequence)
            try:
                plain = [(row, last[s.seq_id]) for s, row in zip(seqs, h.first_rows) if s.feed_previous]
            except KeyError:
                raise RuntimeError(_NOT_DRAWN) from None
            return Feed(self.ints, self._last_tokens, self.block_size, plain, []) if plain else None
        plain, moved = [], []
        drawn = 0  # rows drawn by the sequences before
        for i, (s, row) in enumerate(zip(seqs, h.first_rows)):
            if s.feed_previous:
                src = last.get(s.seq_id)
                if src is None:
                    raise RuntimeError(_NOT_DRAWN)
                drafts = self._last_drafts.get(s.seq_id)
                if drafts:
                    moved.append(Moved(src, drafts, row, i, len(s.token_ids), drawn, s.num_samples))
                else:
                    plain.append((row, src))
            drawn += s.num_samples
        return Feed(self.ints, self._last_tokens, self.block_size, plain, moved) if plain or moved else None

    @torch.inference_mode()
    def launch(self, step: Step, fill_masks: MaskFiller | None = None) -> Launched:
        """Queue the step on the device: forward, draws, and the copy of the results to host memory.
        `fill_masks(owners, before)`, called once the forward is queued, returns the allowed tokens of the drawn
        rows as a host bitmask (structured output), or None; `owners` names each row's sequence, `before` the
        drafts drawn ahead of it (None: no drafts)."""
        began = None
        if self.device.type == "cuda":  # the step's time on the device, launch gaps included, is read at collect
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        drawing, out, scores = self._draw(step, fill_masks)
        if out is None:
            return Launched(drawing, None, None, None, None, scores)
        if self.device.type != "cuda":
            return Launched(drawing, out.tokens, out.logprobs, out.logprob_ids, None, scores)
        # Two token buffers take turns: a launched step is always read before the one after next is launched.
        self._token_buf ^= 1
        tokens = self._host_tokens[self._token_buf][: out.tokens.shape[0]].copy_(out.tokens, non_blocking=True)
        host = [tokens] + [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                           for t in (out.logprobs, out.logprob_ids)]
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return Launched(drawing, *host, done, scores, began)

    @torch.inference_mode()
    def draw(self, step: Step) -> tuple[list[int], torch.Tensor | None]:
        """Queue the step and its draws, and leave the draws on the device: (drawing sequence ids in row order, one
        token each). A drafter chains steps this way (each feeds the last one's draws with `feed_previous`) and
        reads them all at once; a step with drafts to verify goes through `launch`."""
        drawing, out, _ = self._draw(step, None)
        return [s.seq_id for s in drawing], None if out is None else out.tokens

    def _draw(self, step: Step, fill_masks: MaskFiller | None) -> tuple[list[SeqStep], SamplerOutput | None, dict]:
        seqs, logits, scores = self.compute_logits(step)
        drawing = [s for s in seqs if s.sampling is not None]
        if logits is None:
            return drawing, None, scores
        rows, positions, before = expand_rows(drawing)
        allowed = None
        if fill_masks is not None:
            allowed = fill_masks([s.seq_id for s in drawing for _ in range(s.num_samples)], before)
        sb = self.sampling.build(rows, positions, before, self.ints, allowed)
        if sb is not None and self._feed is not None:  # (seeded draws: their noise follows the output index)
            self._feed.move_draws(sb.positions)
        if sb is None:
            out = SamplerOutput(kernels.argmax(logits) if self.fused else logits.argmax(dim=-1), None, None)
        else:
            out = sample(logits, sb, self.fused)
        rows, drafts, r = {}, {}, 0
        for s in drawing:
            rows[s.seq_id] = r
            if s.num_drafts and s.draft_parents is None:  # (a tree's step is read before the next is planned)
                drafts[s.seq_id] = s.token_ids[len(s.token_ids) - s.num_drafts :]
            r += s.num_samples
        self._last_rows, self._last_tokens, self._last_drafts = rows, out.tokens, drafts
        return drawing, out, scores

    def collect(self, launched: Launched) -> list[SeqResult]:
        """Wait for a launched step and read its results: per drawing sequence, its accepted tokens."""
        if launched.tokens is None:
            return []
        wait = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
            launched.device_seconds = launched.began.elapsed_time(launched.done) / 1e3
        self.gpu_wait_s += time.perf_counter() - wait
        tokens = launched.tokens.tolist()
        lps = ids = None
        if launched.logprobs is not None:
            lps, ids = launched.logprobs.tolist(), launched.logprob_ids.tolist()
        if lps is None and not any(s.num_drafts for s in launched.seqs):  # the common case: one token each
            return [SeqResult(s.seq_id, [t]) for s, t in zip(launched.seqs, tokens)]
        results, r = [], 0
        for s in launched.seqs:
            k = s.num_drafts
            drafts = s.token_ids[len(s.token_ids) - k :] if k else []
            path = walk_tree(tokens[r : r + k + 1], drafts, s.draft_parents)
            if s.draft_parents is not None and (self.aux_layers or self.keep_hidden):  # (a draft head reads them)
                self.kept_rows[s.seq_id] = [0] + [1 + i for i in path]
            kept = [r] + [r + 1 + i for i in path]  # the rows whose draws are kept: the root's, then each kept draft's
            top = s.sampling.params.logprobs
            row_lps = None if lps is None or top is None else [dict(zip(ids[j][: 1 + top], lps[j][: 1 + top])) for j in kept]
            results.append(SeqResult(s.seq_id, [tokens[j] for j in kept], row_lps,
                                     None if s.draft_parents is None else path))
            r += k + 1
        return results

    def execute(self, step: Step) -> list[SeqResult]:
        """Launch and collect one step."""
        return self.collect(self.launch(step))

    def _graph_shaped(self, h: HostInputs) -> HostInputs:
        """h, or h padded to the verifying ladder's tokens a sequence where that lets it replay one graph."""
        q = max(self.graphs, default=1)  # (the ladders: decodes, and 1 + k where drafts are verified)
        n = h.query_lens
        if q == 1 or max(n) == 1 or all(x == q for x in n):
            return h
        ladder = self.graphs[q]
        if not ladder.fits(len(n)) or ladder.size_for(len(n)) * q > PAD_TO_GRAPH_TOKENS:  # (rows the replay computes)
            return h
        slack = max(map(len, self._last_drafts.values()), default=0)  # (positions a Feed may yet move back)
        return front_padded(h, q, self.kv.pad_slot, slack) or h

    def _forward(self, h: HostInputs, feed: Feed | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of every token of the step (and with aux_layers the states entering them): a captured graph
        when one fits, else captured pieces, else eagerly."""
        q = h.query_lens[0]
        ladder = self.graphs.get(q)  # (its captured attention has no tree mask: a tree's step runs in pieces)
        if ladder is not None and h.trees is None and all(n == q for n in h.query_lens) and ladder.fits(len(h.query_lens)):
            return ladder.run(h, feed)
        if self.pieces is not None and self.pieces.fits(len(h.input_ids)):
            return self.pieces.run(h, feed)
        ids, positions, meta = eager_inputs(h, self.ints)
        if feed is not None:
            feed(ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables)
        return self.model(ids, positions, meta, self.aux_layers)

    def _take(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows], the index staged with the step's other inputs; no copy when every row is taken."""
        if len(rows) == hidden.shape[0]:
            return hidden
        idx = self.ints.put(rows)
        self.ints.upload()
        return hidden[idx()]


@dataclass
class Launched:
    """A step queued on the device; its results land in host memory (pinned on CUDA) once `done` has passed."""

    seqs: list[SeqStep]  # the drawing sequences, in run order
    tokens: torch.Tensor | None
    logprobs: torch.Tensor | None
    logprob_ids: torch.Tensor | None
    done: torch.cuda.Event | None
    prompt_scores: dict[int, list[PromptScore]] = field(default_factory=dict)  # prompt_logprobs, by sequence id
    began: torch.cuda.Event | None = None
    # from the step's first launch to its results on the device, once collected: its own work, and the gaps where the
    # device waited for the host to launch the next kernel (an eager step's); 0 without CUDA
    device_seconds: float = 0.0
