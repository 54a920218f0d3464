"""Model runner: orchestrates the rooms of runner/ for one step at a time.

A `Step` (plain data) in; the forward runs through a CUDA graph when every sequence computes the same number
of tokens and a ladder was captured for it, eagerly otherwise; then the rows to draw become logits and tokens.
For a sequence that verifies k drafts, the k + 1 rows are drawn with the request's own sampling rule and the
drafts are accepted while they equal the draws: for drafts proposed deterministically (n-gram lookup) this is
exactly speculative sampling's rule, so the output distribution is that of plain decoding.

Decode-only steps run ahead: when the core says the same decodes come next, the next forward is launched (fed
the tokens just sampled, still on the device) before the host reads this step's tokens, so the GPU works
while the host does its bookkeeping.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from slipstream import kernels
from slipstream.attention.registry import create_backend, resolve_backend
from slipstream.config import EngineConfig, ModelConfig
from slipstream.layers.linear import finish_loading
from slipstream.layers.sampler import SamplerOutput, sample
from slipstream.loader.dummy import init_dummy_weights
from slipstream.models import model_class
from slipstream.runner.batch import SeqResult, SeqStep, Step
from slipstream.runner.cuda_graphs import GraphLadder
from slipstream.runner.device import dtype_name, resolve_device, resolve_dtype
from slipstream.runner.inputs import HostInputs, Stager, eager_inputs, host_inputs, shared_prefix_len
from slipstream.runner.kv_pool import KVPool
from slipstream.runner.sampling import Draw, SamplingTensors

log = logging.getLogger(__name__)

WeightSource = Callable[[], Iterator[tuple[str, torch.Tensor]]] | None  # None: random weights


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: WeightSource, max_model_len: int,
                 eos_ids: set[int]) -> None:
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
        self.model = self._build(weights)
        sched = config.scheduler
        width = -(-max_model_len // bs)
        # Room for one step: ids, positions, slots per token; per sequence its block table, query start, length and
        # sampling ints; sampled-row indices (alignment padding is covered by the +64).
        self.ints = Stager(self.device, torch.int64, 5 * sched.max_num_batched_tokens + sched.max_num_seqs * (width + 8) + 64)
        self.sampling = SamplingTensors(self.device, mc.vocab_size, sorted(eos_ids), sched.max_num_batched_tokens)
        self.kv = KVPool(mc, bs, self.dtype, self.device)
        self.num_blocks = self.kv.size(config.cache, max_model_len, sched.max_num_seqs, self._profile_free_bytes)
        self.kv.allocate(self.num_blocks, self.backend)
        self.graphs: dict[int, GraphLadder] = {}
        self._graph_pool = None
        if self.device.type == "cuda" and self.fused and not config.enforce_eager:
            self.capture_graphs(1)
        self.gpu_wait_s = 0.0  # host time spent blocked on the GPU (benchmarks derive the CPU share of a step)
        self._ahead: _Ahead | None = None
        if self.device.type == "cuda":
            self._host_tokens = torch.empty(1024, dtype=torch.int64, pin_memory=True)
            self._tokens_ready = torch.cuda.Event()

    def _build(self, weights: WeightSource) -> torch.nn.Module:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_class(self.model_config.architecture)(self.model_config, self.backend, fused=self.fused)
        finally:
            torch.set_default_dtype(default_dtype)
        if weights is None:
            init_dummy_weights(model, self.config.seed)
            finish_loading(model)
        else:
            model.load_weights(weights())
        return model.eval()

    @property
    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block

    def capture_graphs(self, query_len: int) -> None:
        """Capture a ladder of CUDA graphs for steps whose sequences each compute `query_len` tokens (1: decodes;
        1 + k: verifying k drafts). Ladders share one memory pool."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        max_seqs = min(self.config.scheduler.max_num_seqs, 256, self.config.scheduler.max_num_batched_tokens // query_len)
        self.graphs[query_len] = GraphLadder(self.model, self.ints, query_len, max_seqs, self.max_model_len, self.block_size,
                                             self.kv.pad_slot, self.num_blocks, self.cascade, self._graph_pool)

    def _profile_free_bytes(self) -> int:
        """Run the largest step once (no KV pool yet) to measure peak activation memory, then budget the rest."""
        sched = self.config.scheduler
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = sched.max_num_batched_tokens
        nblk = -(-tokens // self.block_size)
        tmp = self.kv.bind_scratch(nblk, self.backend)
        ids = torch.randint(0, self.model_config.vocab_size, (tokens,)).tolist()
        slots = list(range(tokens))
        with torch.inference_mode():
            self.ints.reset()
            h = HostInputs(ids, slots, slots, [tokens], [tokens], [list(range(nblk))], [], 0, 0)
            hidden = self.model(*eager_inputs(h, self.ints))
            logits = self.model.compute_logits(hidden[: min(tokens, sched.max_num_seqs)])
            del hidden
            probs = torch.softmax(logits.float(), -1)
            probs.sort(dim=-1, descending=True)
            del logits, probs
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - tmp.numel() * tmp.element_size()
        del tmp
        self.backend.bind_kv([], [])
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free = int(total * self.config.cache.gpu_memory_utilization) - peak
        if free <= 0:
            raise ValueError(f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f})")
        return free

    # ---- one step ----
    @torch.inference_mode()
    def compute_logits(self, step: Step) -> tuple[list[SeqStep], list[Draw], torch.Tensor | None]:
        """Run the step's forward: (its sequences in run order, the rows to draw, their logits [rows, vocab])."""
        seqs = sorted(step.seqs, key=lambda s: len(s.token_ids) != 1)  # one-token sequences first: decode kernel
        self.ints.reset()
        ahead, self._ahead = self._ahead, None
        rows = ahead.rows_for(seqs) if ahead is not None else None
        if rows is not None:
            hidden = self._take(ahead.hidden, rows)
        else:
            h = host_inputs(seqs, self.block_size, self.cascade)
            hidden = self._take(self._forward(h), h.sample_rows)
        draws = [Draw(s.sampling, j, s.token_ids[len(s.token_ids) - s.num_drafts :])
                 for s in seqs if s.sampling is not None for j in range(s.num_samples)]
        return seqs, draws, self.model.compute_logits(hidden) if draws else None

    @torch.inference_mode()
    def execute(self, step: Step) -> list[SeqResult]:
        """Run one forward over the step; draw for every sequence that has a sampling row."""
        seqs, draws, logits = self.compute_logits(step)
        if not draws:
            return []
        drawing = [s for s in seqs if s.sampling is not None]
        sb = self.sampling.build(draws, self.ints)
        if sb is None:
            out = SamplerOutput(kernels.argmax(logits) if self.fused else logits.argmax(dim=-1), None, None)
        else:
            out = sample(logits, sb, self.fused)
        decode_only = len(draws) == len(seqs) and all(len(s.token_ids) == 1 for s in seqs)
        ladder = self.graphs.get(1)
        if ladder is not None and step.run_ahead and decode_only and out.logprobs is None and ladder.fits(len(seqs)):
            n = len(draws)
            self._host_tokens[:n].copy_(out.tokens, non_blocking=True)
            self._tokens_ready.record()
            self._ahead = self._run_ahead(seqs, out.tokens)
            wait = time.perf_counter()
            self._tokens_ready.synchronize()
            tokens = self._host_tokens[:n].tolist()
        else:
            wait = time.perf_counter()
            tokens = out.tokens.tolist()  # the step's one host sync
        self.gpu_wait_s += time.perf_counter() - wait
        lps = ids = None
        if out.logprobs is not None:
            lps, ids = out.logprobs.tolist(), out.logprob_ids.tolist()
        results, r = [], 0
        for s in drawing:
            k = s.num_drafts
            drafts = s.token_ids[len(s.token_ids) - k :] if k else []
            accepted = 0
            while accepted < k and tokens[r + accepted] == drafts[accepted]:
                accepted += 1
            n = accepted + 1
            top = s.sampling.params.logprobs
            row_lps = None if lps is None or top is None else [
                dict(zip(ids[r + j][: 1 + top], lps[r + j][: 1 + top])) for j in range(n)
            ]
            results.append(SeqResult(s.seq_id, tokens[r : r + n], row_lps))
            r += k + 1
        return results

    def _forward(self, h: HostInputs) -> torch.Tensor:
        """Hidden states of every token of the step: a captured graph when one fits, else eagerly."""
        q = h.query_lens[0]
        ladder = self.graphs.get(q)
        uniform = ladder is not None and all(n == q for n in h.query_lens) and ladder.fits(len(h.query_lens))
        if uniform:
            return ladder.run(h)
        return self.model(*eager_inputs(h, self.ints))

    def _take(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows], the index staged with the step's other inputs; no copy when every row is taken."""
        if len(rows) == hidden.shape[0]:
            return hidden
        idx = self.ints.put(rows)
        self.ints.upload()
        return hidden[idx()]

    def _run_ahead(self, seqs: list[SeqStep], tokens: torch.Tensor) -> _Ahead | None:
        """Launch the decode step that feeds each sequence the token just sampled (still on the device)."""
        bs = self.block_size
        pos = [s.start + 1 for s in seqs]  # where the sampled token will sit
        if any(p >= self.max_model_len or p // bs >= len(s.block_table) for s, p in zip(seqs, pos)):
            return None  # a sequence needs a new page first: the scheduler must allocate it
        self.ints.reset()
        tables, lens = [s.block_table for s in seqs], [p + 1 for p in pos]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]
        shared = shared_prefix_len(tables, lens, bs) if self.cascade else 0
        h = HostInputs([], pos, slots, [1] * len(seqs), lens, tables, list(range(len(seqs))), len(seqs), shared)
        return _Ahead([s.seq_id for s in seqs], pos, self.graphs[1].run(h, device_ids=tokens))


@dataclass
class _Ahead:
    """A decode forward launched before the host read the previous step's tokens."""

    seq_ids: list[int]
    positions: list[int]  # position of the token each row was fed
    hidden: torch.Tensor

    def rows_for(self, seqs: list[SeqStep]) -> list[int] | None:
        """Rows of `hidden` that serve this step, if it is the same decodes (or some of them, in order)."""
        index = {sid: i for i, sid in enumerate(self.seq_ids)}
        rows: list[int] = []
        for s in seqs:
            i = index.get(s.seq_id)
            if len(s.token_ids) != 1 or s.sampling is None or i is None or (rows and i <= rows[-1]):
                return None
            if s.start != self.positions[i]:
                return None
            rows.append(i)
        return rows
