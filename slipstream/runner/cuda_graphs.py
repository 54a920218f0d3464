"""CUDA graphs of the model's forward: for each query length q (1 for decodes, 1 + k to verify k drafts), a
ladder of batch sizes sharing one memory pool (`GraphLadder`); for steps of any other shape, the forward in
pieces between the layers' attention calls, for a ladder of token counts (`PiecewiseLadder`).

Inputs live in static buffers; a batch of B sequences replays the smallest captured size >= B. Padded rows
write to the padding page: with q = 1 their context is 0 and the decode kernel skips them; with q > 1 their context
is q tokens, read through whatever table row the buffer holds (the padding page's at capture, a sequence's from an
earlier replay: in bounds either way), and their output is dropped. The decode grid is
sized for max_model_len, so one graph serves every context length. Sampling runs after the graph, eagerly
(its shape depends on the requests' parameters)."""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator, TypeVar

import torch

from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.kernels._slices import tile_counts
from slipstream.runner.inputs import Feed, HostInputs, Stager, eager_inputs

T = TypeVar("T")


class CapturePool:
    """A private memory pool that graphs share, and the one stream they are captured on (a pool's freed blocks are
    reused only on the stream that freed them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        tile_counts(device)  # the split-K kernels' arrival counts, zeroed once, before any capture records them

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """On the capture stream, once the device has done what the current stream queued (the inputs) and the memory
        cached since (a warm-up's activations) is given back, with Python's garbage collector paused: a collection that
        frees a CUDA object (a graph, a kernel) in the middle of a capture breaks it. (While a capture is under way the
        allocator cannot free cached blocks to make room, so a warm-up's would add to the capture's peak;
        torch.cuda.graph empties the cache the same way.)"""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            if enabled:
                gc.enable()

    def capture(self, fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
        """`fn`'s launches as a graph, and its result (which replays rewrite)."""
        graph = torch.cuda.CUDAGraph()
        with self.capturing():
            graph.capture_begin(pool=self.handle)
            try:
                out = fn()
            except BaseException:
                abandon(graph)
                raise
            graph.capture_end()
        return graph, out


def abandon(graph: torch.cuda.CUDAGraph) -> None:
    """End a capture that failed: ending it raises too (it is void), which would hide the error that broke it."""
    with contextlib.suppress(RuntimeError):
        graph.capture_end()


class GraphLadder:
    def __init__(self, model: torch.nn.Module, stager: Stager, query_len: int, max_seqs: int, max_model_len: int,
                 block_size: int, pad_slot: int, pad_page: int, cascade: bool, pool: CapturePool,
                 aux_layers: tuple[int, ...] = ()) -> None:
        """`aux_layers`: the model also returns the states entering these layers (for an EAGLE-3 head)."""
        if query_len > block_size:
            raise ValueError(f"graphs for {query_len} tokens per sequence need block_size >= {query_len}")
        self.model, self.stager, self.q = model, stager, query_len
        self.max_model_len, self.pad_slot = max_model_len, pad_slot
        # The cascade kernel is part of the decode graph (one sequence shares with nobody, so not for size 1).
        self.cascade = cascade and query_len == 1
        self.sizes = sorted({s for s in [1, 2, 4, 8, *range(16, max_seqs + 1, 16)] if s <= max_seqs} | {max_seqs})
        dev = stager.device
        width = -(-max_model_len // block_size)
        n = max_seqs * query_len
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int64, device=dev)
        self.tables = torch.full((max_seqs, width), pad_page, dtype=torch.int64, device=dev)
        self.qsl = torch.arange(0, n + 1, query_len, dtype=torch.int64, device=dev)
        self.shared = torch.zeros(1, dtype=torch.int64, device=dev)  # cascade prefix length, 0 = none
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            for bsz in reversed(self.sizes):  # largest first: later graphs reuse its pool
                self._pad_from(0, bsz)
                meta = self._meta(bsz)
                t = bsz * query_len
                model(self.ids[:t], self.pos[:t], meta, aux_layers)  # warm up (Triton compiles outside the capture)
                self.graphs[bsz] = pool.capture(lambda: model(self.ids[:t], self.pos[:t], meta, aux_layers))
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the warm-ups' activations

    def _meta(self, bsz: int) -> AttentionMetadata:
        q, t = self.q, bsz * self.q
        return AttentionMetadata(
            slot_mapping=self.slots[:t], query_start_loc=self.qsl[: bsz + 1], seq_lens=self.seq_lens[:bsz],
            block_tables=self.tables[:bsz], query_lens_cpu=[q] * bsz, seq_lens_cpu=[self.max_model_len] * bsz,
            max_query_len=q, max_seq_len=self.max_model_len, num_decodes=bsz if q == 1 else 0,
            decode_max_len=self.max_model_len if q == 1 else 0,
            shared_prefix=self.shared if self.cascade and bsz > 1 else None,
        )

    def _pad_rows(self, b: int, size: int) -> tuple[list[int], list[int], list[int]]:
        """Positions, slots and context lengths of padded rows b..size."""
        pad = size - b
        if self.q == 1:
            return [0] * pad, [self.pad_slot] * pad, [0] * pad
        rng = list(range(self.q))
        return rng * pad, [self.pad_slot + i for i in rng] * pad, [self.q] * pad

    def _pad_from(self, b: int, size: int) -> None:
        """Capture-time padding of rows b..size (replays stage theirs with the step's inputs)."""
        pos, slots, lens = self._pad_rows(b, size)
        q = self.q
        self.pos[b * q : size * q].copy_(torch.tensor(pos, dtype=torch.int64))
        self.slots[b * q : size * q].copy_(torch.tensor(slots, dtype=torch.int64))
        self.seq_lens[b:size].copy_(torch.tensor(lens, dtype=torch.int64))

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def size_for(self, num_seqs: int) -> int:
        """The captured batch size a step of `num_seqs` sequences replays."""
        return next(s for s in self.sizes if s >= num_seqs)

    def run(self, h: HostInputs, feed: Feed | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Replay for the step `h` (every sequence has q tokens); `feed` writes what is already on the device (tokens
        just drawn, positions that move with a verdict not read yet) into the staged inputs. Returns the hidden states
        of the real rows."""
        b, q = len(h.seq_lens), self.q
        size = self.size_for(b)
        pos, slots, lens = self._pad_rows(b, size)
        n = size * q
        st = self.stager
        vec = st.put(h.input_ids + [0] * (n - b * q) + h.positions + pos + h.slots + slots + h.seq_lens + lens + [h.shared])
        tab = st.put_table(h.tables)
        st.upload()
        v = vec()
        self.ids[:n].copy_(v[:n])
        self.pos[:n].copy_(v[n : 2 * n])
        self.slots[:n].copy_(v[2 * n : 3 * n])
        self.seq_lens[:size].copy_(v[3 * n : 3 * n + size])
        if self.cascade and size > 1:
            self.shared.copy_(v[3 * n + size :])
        t = tab()
        self.tables[:b, : t.shape[1]].copy_(t)
        if feed is not None:
            feed(self.ids, self.pos, self.slots, self.seq_lens, self.tables)
        graph, out = self.graphs[size]
        graph.replay()
        if isinstance(out, tuple):  # the hidden states and the ones an EAGLE-3 head reads
            return tuple(o[: b * q] for o in out)
        return out[: b * q]


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token counts a piecewise ladder captures: steps of 16 up to 256, then coarser (a step beyond 256 tokens rounds up
    by less than an eighth) up to `max_tokens`."""
    sizes = [*range(16, 257, 16), *range(288, 513, 32), *range(576, 1025, 64), *range(1152, 2049, 128)]
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class PiecewiseLadder:
    """The forward in CUDA graphs for a step of any shape (prompt chunks beside decodes, drafts of several lengths,
    more sequences than a GraphLadder holds): each piece runs from one layer's attention to the next (the norms,
    projections, RoPE and KV store, the MLP or experts, tensor-parallel sums), captured for a ladder of token counts;
    the attention runs eagerly between the pieces with the step's own metadata, since its launch depends on how the
    tokens split into sequences. Such a step costs a replay and an attention launch per layer instead of a dozen
    launches from Python.

    A step of t tokens replays the smallest captured count >= t: the padded rows are token 0 at position 0, write their
    K/V to the padding slot and are left out of the attention (their attention output keeps the finite values some
    earlier step left there); their results are dropped. The attention's queries and output, and the forward's
    results, live in buffers of the largest size that every layer and size shares (a piece copies its queries in, the
    last piece its results out), so the ladder holds one step's buffers, not one per size."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, stager: Stager, max_tokens: int, pad_slot: int,
                 pool: CapturePool, aux_layers: tuple[int, ...] = ()) -> None:
        self.model, self.backend, self.stager, self.pad_slot = model, backend, stager, pad_slot
        self.pool, self.aux_layers = pool, aux_layers
        self.sizes = piecewise_sizes(max_tokens)
        dev, n = stager.device, self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=dev)
        # shaped by the first (largest) warm-up: the attention's queries and output [n, Hq, D], the forward's results
        self.q: torch.Tensor | None = None
        self.o: torch.Tensor | None = None
        self.results: tuple[torch.Tensor, ...] = ()
        # per size: the pieces in order, each with the layer whose attention follows it (None after the last)
        self.graphs: dict[int, list[tuple[torch.cuda.CUDAGraph, int | None, float]]] = {}
        with torch.inference_mode(), pool.capturing():
            for size in reversed(self.sizes):  # largest first: the shared buffers take its shape
                self.graphs[size] = self._capture(size)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the warm-ups' activations, cached for the capture stream

    def _forward(self, size: int, cut: Callable[[int, torch.Tensor, float], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # The pieces read only the slots of the metadata (the KV store); the attention, which reads the rest, is cut out.
        empty = self.ids[:0]
        meta = AttentionMetadata(slot_mapping=self.slots[:size], query_start_loc=empty, seq_lens=empty,
                                 block_tables=empty.view(0, 0), query_lens_cpu=[], seq_lens_cpu=[], max_query_len=0,
                                 max_seq_len=0)
        self.backend.cut = cut
        try:
            out = self.model(self.ids[:size], self.pos[:size], meta, self.aux_layers)
        finally:
            self.backend.cut = None
        return out if isinstance(out, tuple) else (out,)

    def _capture(self, size: int) -> list[tuple[torch.cuda.CUDAGraph, int | None, float]]:
        def warm(layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
            if self.q is None:
                self.q = torch.zeros(self.sizes[-1], *q.shape[1:], dtype=q.dtype, device=q.device)
                self.o = torch.zeros_like(self.q)
            return self.o[:size]

        out = self._forward(size, warm)  # Triton compiles the pieces' kernels for this size outside the capture
        if not self.results:
            self.results = tuple(torch.zeros(self.sizes[-1], *x.shape[1:], dtype=x.dtype, device=x.device) for x in out)
        del out
        torch.cuda.empty_cache()  # the warm-up's activations (see CapturePool.capturing)
        pieces: list[tuple[torch.cuda.CUDAGraph, int | None, float]] = []
        graph: torch.cuda.CUDAGraph | None = None

        def begin() -> None:
            nonlocal graph
            started = torch.cuda.CUDAGraph()
            started.capture_begin(pool=self.pool.handle)
            graph = started

        def end(layer: int | None, scale: float) -> None:
            nonlocal graph
            done, graph = graph, None
            done.capture_end()
            pieces.append((done, layer, scale))

        def cut(layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
            self.q[:size].copy_(q)
            end(layer, scale)
            begin()
            return self.o[:size]

        begin()
        try:
            for res, x in zip(self.results, self._forward(size, cut)):
                res[:size].copy_(x)
            end(None, 0.0)
        except BaseException:
            if graph is not None:  # the capture the error left open
                abandon(graph)
            raise
        return pieces

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def run(self, h: HostInputs, feed: Feed | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Replay for the step `h`; `feed` as for GraphLadder.run. Returns the hidden states of the real rows (and with
        aux_layers the states entering them)."""
        t = len(h.input_ids)
        size = next(s for s in self.sizes if s >= t)
        ids, pos, meta = eager_inputs(h, self.stager, size - t, self.pad_slot)
        self.ids[:size].copy_(ids)
        self.pos[:size].copy_(pos)
        self.slots[:size].copy_(meta.slot_mapping)
        if feed is not None:  # (the attention between the pieces reads the metadata's lengths and tables)
            feed(self.ids, self.pos, self.slots, meta.seq_lens, meta.block_tables)
        q, o = self.q[:t], self.o[:t]
        for graph, layer, scale in self.graphs[size]:
            graph.replay()
            if layer is not None:
                self.backend.compute(layer, q, meta, scale, o)
        if len(self.results) > 1:
            return tuple(x[:t] for x in self.results)
        return self.results[0][:t]
