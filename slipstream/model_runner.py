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
from slipstream.layers.sampler import Penalties, SamplerOutput, SamplingBatch, sample
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
        # Cascade decode: prefix-cache hits put the same pages at the head of many tables; the Triton decode
        # path then reads them once per step for the whole batch.
        self.cascade = backend == "triton" and config.cache.enable_prefix_caching
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
        sched = config.scheduler
        # Room for one step: ids, positions, slots per token; per sequence its block table, query start, length,
        # sampled row and sampling ints (alignment padding is covered by the +64).
        width = -(-max_model_len // self.block_size)
        self.stager = Stager(self.device, torch.int64, 4 * sched.max_num_batched_tokens + sched.max_num_seqs * (width + 8) + 64)
        self.fstager = Stager(self.device, torch.float32, 3 * sched.max_num_seqs + 16)
        self.num_blocks = self._size_kv_pool()
        # One page more than the block manager hands out: padded rows of a CUDA graph write their K/V there.
        self.pad_slot = self.num_blocks * self.block_size
        shape = (self.num_blocks + 1, self.block_size, mc.num_kv_heads, mc.head_dim)
        # Zeros, not whatever the allocator held: the Hopper prefill kernel loads whole key tiles and cancels the
        # slots past a context with P = 0, which needs them finite.
        for layer in self.model.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.graphs = DecodeGraphs(self) if self._use_graphs() else None
        self.gpu_wait_s = 0.0  # host time spent blocked on the GPU (benchmarks derive the CPU share of a step)
        self._ahead: _Ahead | None = None
        if self.device.type == "cuda":
            self._host_tokens = torch.empty(1024, dtype=torch.int64, pin_memory=True)
            self._tokens_ready = torch.cuda.Event()

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
        ids = torch.randint(0, mc.vocab_size, (tokens,)).tolist()
        with torch.inference_mode():
            self.stager.reset()
            hidden = self._eager_forward(ids, list(range(tokens)), list(range(tokens)), [tokens], [tokens], [list(range(nblk))], 0)
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

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, run_ahead: bool = False) -> list[tuple[Sequence, SampledToken]]:
        """Run one forward over the batch; sample for every sequence whose step reaches its last token.

        One-token sequences go first: the attention backend runs its decode kernel on them. With `run_ahead`
        (the caller expects the same decodes next step), a decode-only step launches the next step's forward
        before waiting for this step's tokens, so the GPU works while the host does its bookkeeping."""
        items = sorted(zip(batch.seqs, batch.num_new_tokens), key=lambda it: it[1] != 1)
        self.stager.reset()
        ahead, self._ahead = self._ahead, None
        rows = ahead.rows_for(items) if ahead is not None else None
        if rows is not None:
            hidden = self._rows(ahead.hidden, rows)
            to_sample = [s for s, _ in items]
        else:
            hidden, to_sample = self._forward(items)
        if not to_sample:
            return []
        logits = self.model.compute_logits(hidden)
        sb = self._sampling_batch(to_sample)
        if sb is None:
            out = SamplerOutput(kernels.argmax(logits) if kernels.enabled(logits) else logits.argmax(dim=-1), None, None)
        else:
            out = sample(logits, sb)
        decode_only = len(to_sample) == len(items) and all(n == 1 for _, n in items)
        if self.graphs is not None and run_ahead and decode_only and out.logprobs is None and self.graphs.fits(len(items)):
            n = len(to_sample)
            self._host_tokens[:n].copy_(out.tokens, non_blocking=True)
            self._tokens_ready.record()
            self._ahead = self._run_ahead(to_sample, out.tokens)
            wait = time.perf_counter()
            self._tokens_ready.synchronize()
            tokens = self._host_tokens[:n].tolist()
        else:
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

    def _forward(self, items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward the scheduled tokens; return the hidden states of the rows to sample, and their sequences."""
        bs = self.block_size
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
        shared = shared_prefix_len(tables[:num_decodes], seq_lens[:num_decodes], bs) if self.cascade else 0
        if self.graphs is not None and num_decodes == len(items) and self.graphs.fits(num_decodes):
            hidden = self.graphs.run(input_ids, positions, slots, seq_lens, tables, shared)
        else:
            hidden = self._eager_forward(input_ids, positions, slots, [n for _, n in items], seq_lens, tables, num_decodes, shared)
        return self._rows(hidden, sample_rows), to_sample

    def _rows(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows], staged with the step's other inputs; no copy when every row is taken."""
        if len(rows) == hidden.shape[0]:
            return hidden
        idx = self.stager.put(rows)
        self.stager.upload()
        return hidden[idx()]

    def _eager_forward(self, input_ids: list[int], positions: list[int], slots: list[int], query_lens: list[int],
                       seq_lens: list[int], tables: list[list[int]], num_decodes: int, shared: int = 0) -> torch.Tensor:
        """Stage the step's inputs in one upload and run the model without a graph."""
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        st = self.stager
        ids_t, pos_t, slots_t, qsl_t, lens_t = st.put(input_ids), st.put(positions), st.put(slots), st.put(qsl), st.put(seq_lens)
        shared_t = st.put([shared]) if shared else None
        tables_t = st.put_table(tables)
        st.upload()
        meta = AttentionMetadata(
            slot_mapping=slots_t(), query_start_loc=qsl_t(), seq_lens=lens_t(), block_tables=tables_t(),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            num_decodes=num_decodes, decode_max_len=max(seq_lens[:num_decodes], default=0),
            shared_prefix=shared_t() if shared_t else None,
        )
        return self.model(ids_t(), pos_t(), meta)

    def _run_ahead(self, seqs: list[Sequence], tokens: torch.Tensor) -> _Ahead | None:
        """Launch the decode step that feeds each sequence the token just sampled (still on the device)."""
        bs = self.block_size
        pos = [s.num_tokens for s in seqs]  # where the sampled token will sit
        if any(p >= self.max_model_len or p // bs >= len(s.block_table) for s, p in zip(seqs, pos)):
            return None  # a sequence needs a new page first: the scheduler must allocate it
        self.stager.reset()
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        tables, lens = [s.block_table for s in seqs], [p + 1 for p in pos]
        hidden = self.graphs.run(tokens, pos, slots, lens, tables, shared_prefix_len(tables, lens, bs) if self.cascade else 0)
        return _Ahead(list(seqs), pos, hidden)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch | None:
        """Sampling tensors for these rows, or None when plain argmax will do (all greedy, nothing to adjust)."""
        dev, vocab = self.device, self.model_config.vocab_size
        ps = [s.params for s in seqs]
        plain = all(p.greedy and p.logprobs is None and not p.logit_bias and not p.needs_penalties for p in ps)
        if plain and not any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            return None

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
        n = len(seqs)
        floats = self.fstager
        floats.reset()  # the int stager keeps this step's inputs: sampling appends to it
        f = floats.put([p.temperature for p in ps] + [p.top_p for p in ps] + [p.min_p for p in ps])
        i = self.stager.put([p.top_k if p.top_k > 0 else vocab for p in ps] + [s.seed for s in seqs] + [s.num_output_tokens for s in seqs])
        floats.upload()
        self.stager.upload()
        fv, iv = f().view(3, n), i().view(3, n)
        return SamplingBatch(
            temperature=fv[0],
            top_k=iv[0],
            top_p=fv[1],
            min_p=fv[2],
            seeds=iv[1],
            positions=iv[2],
            all_greedy=all(p.greedy for p in ps),
            use_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            use_min_p=any(p.min_p > 0 for p in ps),
            max_logprobs=max(wants) if wants else None,
            bias=bias,
            banned=banned,
            penalties=penalties,
        )


_MIN_SHARED = 256  # shorter common prefixes are not worth the cascade kernel's launch


def shared_prefix_len(tables: list[list[int]], seq_lens: list[int], block_size: int) -> int:
    """Context tokens (whole pages) at the head of every sequence that live in the very same pages, or 0.

    Only the prefix cache puts one page in several tables, and a cached page determines every page before it
    (it is a node of the radix tree), so "page j is shared by all" holds for a prefix of j: binary search."""
    if len(tables) < 2:
        return 0
    first = tables[0]
    hi = min((n - 1) // block_size for n in seq_lens)  # pages wholly before each sequence's newest token
    if hi == 0 or any(t[0] != first[0] for t in tables):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        page = first[mid - 1]
        if all(t[mid - 1] == page for t in tables):
            lo = mid
        else:
            hi = mid - 1
    return lo * block_size if lo * block_size >= _MIN_SHARED else 0


class Stager:
    """Packs a step's small inputs into one host buffer (pinned on CUDA) and uploads them in one copy.

    `put` returns a getter for the device view, valid after `upload`. Two host buffers alternate, each guarded
    by an event, so a buffer whose copy may still be queued (the runner launches the next decode before it
    waits on this one) is never overwritten."""

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int) -> None:
        self.device, self.dtype = device, dtype
        self.pinned = device.type == "cuda"
        self.bufs = [self._alloc(capacity), self._alloc(capacity)]
        self.cur = 0
        self.host, self.np, self.dev, self.event = self.bufs[0]
        self.used = self.uploaded = 0

    def _alloc(self, capacity: int) -> list:
        host = torch.empty(capacity, dtype=self.dtype, pin_memory=self.pinned)
        dev = torch.empty(capacity, dtype=self.dtype, device=self.device) if self.pinned else host
        return [host, host.numpy(), dev, torch.cuda.Event() if self.pinned else None]

    def reset(self) -> None:
        """Start filling the other buffer (after its last upload has left the host)."""
        self.cur ^= 1
        self.host, self.np, self.dev, self.event = self.bufs[self.cur]
        if self.event is not None:
            self.event.synchronize()
        self.used = self.uploaded = 0

    def _reserve(self, n: int) -> int:
        # Every slice starts 16-byte aligned: Triton specializes kernels on pointer alignment, and a slice at an
        # odd offset would compile a new variant in the middle of serving.
        align = 16 // self.host.element_size()
        self.used = -(-self.used // align) * align
        if self.used + n > self.host.numel():
            raise RuntimeError(f"staging buffer of {self.host.numel()} entries is too small for this step")
        start = self.used
        self.used += n
        return start

    def put(self, values: list):  # noqa: ANN201 - returns a getter
        start = self._reserve(len(values))
        self.np[start : start + len(values)] = values
        return lambda: self.dev[start : start + len(values)]

    def put_table(self, rows: list[list[int]]):  # noqa: ANN201
        width = max(len(r) for r in rows)
        start = self._reserve(len(rows) * width)
        view = self.np[start : start + len(rows) * width].reshape(len(rows), width)
        for i, r in enumerate(rows):
            view[i, : len(r)] = r
            view[i, len(r) :] = 0
        return lambda: self.dev[start : start + len(rows) * width].view(len(rows), width)

    def upload(self) -> None:
        """Copy what was put since the last upload."""
        if self.pinned and self.used > self.uploaded:
            self.dev[self.uploaded : self.used].copy_(self.host[self.uploaded : self.used], non_blocking=True)
            self.event.record()
        self.uploaded = self.used


@dataclass
class _Ahead:
    """A decode forward launched before the host read the previous step's tokens."""

    seqs: list[Sequence]
    positions: list[int]  # position of the token each row was fed
    hidden: torch.Tensor

    def rows_for(self, items: list[tuple[Sequence, int]]) -> list[int] | None:
        """Rows of `hidden` that serve this batch, if it is the same decodes (or some of them, in order)."""
        index = {id(s): i for i, s in enumerate(self.seqs)}
        rows = []
        for seq, n in items:
            i = index.get(id(seq))
            if n != 1 or i is None or (rows and i <= rows[-1]):
                return None
            if seq.num_computed_tokens != self.positions[i] or seq.num_tokens != self.positions[i] + 1:
                return None
            rows.append(i)
        return rows


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
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.tables = torch.full((max_bs, width), runner.num_blocks, dtype=torch.int64, device=dev)
        self.qsl = torch.arange(max_bs + 1, dtype=torch.int64, device=dev)
        self.shared = torch.zeros(1, dtype=torch.int64, device=dev)  # cascade prefix length, 0 = none
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
            shared_prefix=self.shared if self._cascades(bsz) else None,
        )

    def _cascades(self, bsz: int) -> bool:
        """Does the graph of this size carry the shared-prefix kernel? (One sequence shares with nobody.)"""
        return self.runner.cascade and bsz > 1

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, ids: list[int] | torch.Tensor, pos: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], shared: int = 0) -> torch.Tensor:
        """Replay the graph for len(pos) decodes; `ids` may already be on the device (tokens just sampled)."""
        b = len(pos)
        size = next(s for s in self.sizes if s >= b)
        pad = size - b
        st = self.runner.stager
        host_ids = [0] * size if isinstance(ids, torch.Tensor) else ids + [0] * pad
        # Padded rows have context 0: they lie outside any shared prefix, and their decode programs exit at once.
        vec = st.put(host_ids + pos + [0] * pad + slots + [self.runner.pad_slot] * pad + seq_lens + [0] * pad + [shared])
        tab = st.put_table(tables)
        st.upload()
        v = vec()[: 4 * size].view(4, size)
        if self._cascades(size):
            self.shared.copy_(vec()[4 * size :])
        self.ids[:size].copy_(v[0])
        if isinstance(ids, torch.Tensor):
            self.ids[:b].copy_(ids)
        self.pos[:size].copy_(v[1])
        self.slots[:size].copy_(v[2])
        self.seq_lens[:size].copy_(v[3])
        t = tab()
        self.tables[:b, : t.shape[1]].copy_(t)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
