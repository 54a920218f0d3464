"""Model runner: a `ScheduledBatch` in, one sampled token per finished-prefill sequence out.

Owns the device, the model, the paged KV pool and the sampler. It reads sequences (tokens, computed count,
block table, sampling params) but never changes scheduling state; the engine applies what it returns.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from slipstream import kernels
from slipstream.attention import AttentionMetadata, get_backend
from slipstream.config import EngineConfig, ModelConfig
from slipstream.engine.scheduler import ScheduledBatch
from slipstream.engine.sequence import Sequence
from slipstream.layers.sampler import Penalties, SamplingBatch, sample
from slipstream.loader import LoadedModel, init_dummy_weights
from slipstream.models import build_model

log = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30  # default KV budget on CPU


@dataclass
class SampledToken:
    token: int
    logprobs: dict[int, float] | None  # sampled token first, then the top-n alternatives


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of: auto, cpu, cuda; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if model.dtype == "float16" else torch.bfloat16
    if name not in table:
        raise ValueError(f"dtype must be one of: auto, {', '.join(table)}; got {name!r}")
    return table[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, max_model_len: int, eos_ids: set[int]) -> None:
        self.config = config
        self.model_config = mc = loaded.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, mc, self.device)
        self.eos_ids = sorted(eos_ids)
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "triton" and self.device.type != "cuda":
            raise ValueError("attention_backend 'triton' needs a CUDA device; use 'torch' on CPU")
        self.backend_name = backend
        kernels.enable(backend == "triton")
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(mc, get_backend(backend))
        finally:
            torch.set_default_dtype(default_dtype)
        if loaded.weights is None:
            init_dummy_weights(self.model, config.seed)
        else:
            self.model.load_weights(loaded.weights())
        self.model.eval().requires_grad_(False)
        self.num_blocks = self._size_kv_pool()
        # One page more than the block manager hands out: padded rows of a CUDA graph write their K/V there.
        self.pad_slot = self.num_blocks * self.block_size
        shape = (self.num_blocks + 1, self.block_size, mc.num_kv_heads, mc.head_dim)
        for layer in self.model.layers:
            layer.self_attn.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.graphs = DecodeGraphs(self) if self._use_graphs() else None
        self.gpu_wait_s = 0.0  # host time spent blocked on the GPU (benchmarks derive the CPU share of a step)

    # ---- KV pool sizing ----
    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize

    def _size_kv_pool(self) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        useful = sched.max_num_seqs * -(-self.max_model_len // self.block_size)  # more can never be used at once
        if cache.num_blocks is not None:
            return self._check_pool(cache.num_blocks)
        if cache.kv_cache_bytes is not None:
            budget = cache.kv_cache_bytes
        elif self.device.type == "cuda":
            budget = self._profile_free_bytes()
        else:
            budget = _CPU_KV_BYTES
        return self._check_pool(min(useful, budget // self.bytes_per_block - 1))  # budget covers the padding page too

    def _check_pool(self, n: int) -> int:
        if n * self.block_size < self.max_model_len:
            raise ValueError(
                f"KV cache of {n} blocks x {self.block_size} tokens cannot hold one sequence of max_model_len="
                f"{self.max_model_len}; lower max_model_len or give the cache more memory"
            )
        return n

    def _profile_free_bytes(self) -> int:
        """Run the largest step once (no KV pool yet) to measure peak activation memory, then budget the rest."""
        sched = self.config.scheduler
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = sched.max_num_batched_tokens
        nblk = -(-tokens // self.block_size)
        mc = self.model_config
        tmp = torch.empty((nblk, self.block_size, mc.num_kv_heads, mc.head_dim), dtype=self.dtype, device=self.device)
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = tmp
        meta = self._metadata([tokens], [tokens], [list(range(nblk))], list(range(tokens)))
        ids = torch.randint(0, mc.vocab_size, (tokens,), device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(tokens, device=self.device), meta)
            rows = min(tokens, sched.max_num_seqs)
            logits = self.model.compute_logits(hidden[:rows])
            del hidden
            probs = torch.softmax(logits.float(), -1)
            probs.sort(dim=-1, descending=True)
            del logits, probs
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - tmp.numel() * tmp.element_size()
        del tmp
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free = int(total * self.config.cache.gpu_memory_utilization) - peak
        if free <= 0:
            raise ValueError(f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f})")
        return free

    # ---- one step ----
    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and self.backend_name == "triton" and not self.config.enforce_eager

    def _metadata(
        self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], slots: list[int], num_decodes: int = 0
    ) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=num_decodes,
            decode_max_len=max(seq_lens[:num_decodes], default=0),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Sequence, SampledToken]]:
        """Run one forward over the batch; sample for every sequence whose step reaches its last token.
        One-token sequences go first: the attention backend runs its decode kernel on them."""
        bs = self.block_size
        items = sorted(zip(batch.seqs, batch.num_new_tokens), key=lambda it: it[1] != 1)
        num_decodes = sum(1 for _, n in items if n == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        to_sample: list[Sequence] = []
        for seq, n in items:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                to_sample.append(seq)
        tables = [s.block_table for s, _ in items]
        if self.graphs is not None and num_decodes == len(items) and self.graphs.fits(num_decodes):
            hidden = self.graphs.run(input_ids, positions, slots, seq_lens, tables)
        else:
            meta = self._metadata([n for _, n in items], seq_lens, tables, slots, num_decodes)
            dev = self.device
            ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
            hidden = self.model(ids_t, torch.tensor(positions, dtype=torch.int64, device=dev), meta)
        if not to_sample:
            return []
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        out = sample(logits, self._sampling_batch(to_sample))
        wait = time.perf_counter()
        tokens = out.tokens.tolist()  # the step's one host sync
        self.gpu_wait_s += time.perf_counter() - wait
        if out.logprobs is None:
            return [(s, SampledToken(t, None)) for s, t in zip(to_sample, tokens)]
        lps, ids = out.logprobs.tolist(), out.logprob_ids.tolist()
        result = []
        for s, t, lp, tid in zip(to_sample, tokens, lps, ids):
            k = s.params.logprobs
            result.append((s, SampledToken(t, None if k is None else dict(zip(tid[: 1 + k], lp[: 1 + k])))))
        return result

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        dev, vocab = self.device, self.model_config.vocab_size
        ps = [s.params for s in seqs]

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        bias = banned = penalties = None
        bias_rows = [(i, tok, v) for i, p in enumerate(ps) for tok, v in p.logit_bias.items() if 0 <= tok < vocab]
        if bias_rows:
            r, c, v = zip(*bias_rows)
            bias = (t(r, torch.int64), t(c, torch.int64), t(v, torch.float32))
        ban_rows = [
            (i, tok)
            for i, s in enumerate(seqs)
            if s.num_output_tokens < s.params.min_tokens
            for tok in (self.eos_ids + s.params.stop_token_ids)
            if 0 <= tok < vocab
        ]
        if ban_rows:
            r, c = zip(*ban_rows)
            banned = (t(r, torch.int64), t(c, torch.int64))
        if any(p.needs_penalties for p in ps):
            counts = torch.zeros((len(seqs), vocab), dtype=torch.float32, device=dev)
            seen = torch.zeros((len(seqs), vocab), dtype=torch.bool, device=dev)
            for i, s in enumerate(seqs):
                out_ids = t(s.output_token_ids, torch.int64)
                counts[i].index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
                seen[i, t(s.token_ids, torch.int64)] = True
            penalties = Penalties(
                repetition=t([p.repetition_penalty for p in ps], torch.float32),
                presence=t([p.presence_penalty for p in ps], torch.float32),
                frequency=t([p.frequency_penalty for p in ps], torch.float32),
                output_counts=counts,
                seen=seen,
            )
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        return SamplingBatch(
            temperature=t([p.temperature for p in ps], torch.float32),
            top_k=t([p.top_k if p.top_k > 0 else vocab for p in ps], torch.int64),
            top_p=t([p.top_p for p in ps], torch.float32),
            min_p=t([p.min_p for p in ps], torch.float32),
            seeds=t([s.seed for s in seqs], torch.int64),
            positions=t([s.num_output_tokens for s in seqs], torch.int64),
            all_greedy=all(p.greedy for p in ps),
            use_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            use_min_p=any(p.min_p > 0 for p in ps),
            max_logprobs=max(wants) if wants else None,
            bias=bias,
            banned=banned,
            penalties=penalties,
        )


class DecodeGraphs:
    """CUDA graphs of the decode forward for a ladder of batch sizes, sharing one memory pool.

    Inputs live in static buffers; a batch of B decodes replays the smallest captured size >= B, its padded
    rows pointed at the padding page with context length 0 (the decode kernel skips them). The grid of the
    decode kernel is sized for max_model_len, so one graph serves every context length. Sampling runs after
    the graph, eagerly (its shape depends on the requests' parameters)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        dev = runner.device
        max_bs = min(runner.config.scheduler.max_num_seqs, 256)
        self.sizes = sorted({s for s in [1, 2, 4, 8, *range(16, max_bs + 1, 16)] if s <= max_bs} | {max_bs})
        width = -(-runner.max_model_len // runner.block_size)
        self.ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_bs,), runner.pad_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.tables = torch.full((max_bs, width), runner.num_blocks, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bsz in reversed(self.sizes):  # largest first: later graphs reuse its pool
                meta = self._meta(bsz)
                runner.model(self.ids[:bsz], self.pos[:bsz], meta)  # warm up (Triton compiles outside the capture)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = runner.model(self.ids[:bsz], self.pos[:bsz], meta)
                self.graphs[bsz] = (graph, out)
        torch.cuda.synchronize(dev)

    def _meta(self, bsz: int) -> AttentionMetadata:
        r = self.runner
        return AttentionMetadata(
            slot_mapping=self.slots[:bsz], query_start_loc=self.qsl[: bsz + 1], seq_lens=self.seq_lens[:bsz],
            block_tables=self.tables[:bsz], query_lens_cpu=[1] * bsz, seq_lens_cpu=[r.max_model_len] * bsz,
            max_query_len=1, max_seq_len=r.max_model_len, num_decodes=bsz, decode_max_len=r.max_model_len,
        )

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, ids: list[int], pos: list[int], slots: list[int], seq_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        b = len(ids)
        size = next(s for s in self.sizes if s >= b)
        pad = size - b
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [self.runner.pad_slot] * pad, seq_lens + [0] * pad],
                            dtype=torch.int64).pin_memory()
        dev = host.to(self.ids.device, non_blocking=True)
        self.ids[:size].copy_(dev[0])
        self.pos[:size].copy_(dev[1])
        self.slots[:size].copy_(dev[2])
        self.seq_lens[:size].copy_(dev[3])
        width = max(len(t) for t in tables)
        tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).pin_memory()
        self.tables[:b, :width].copy_(tab, non_blocking=True)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
