"""CUDA graphs of the model's forward: for each query length q (1 for decodes, 1 + k to verify k drafts), a
ladder of batch sizes sharing one memory pool.

Inputs live in static buffers; a batch of B sequences replays the smallest captured size >= B. Padded rows
point at the padding page: with q = 1 their context is 0 and the decode kernel skips them; with q > 1 they
attend over their own q tokens in that page (q <= block_size) and their output is dropped. The decode grid is
sized for max_model_len, so one graph serves every context length. Sampling runs after the graph, eagerly
(its shape depends on the requests' parameters)."""
from __future__ import annotations

from typing import Callable

import torch

from slipstream.attention.backend import AttentionMetadata
from slipstream.runner.inputs import HostInputs, Stager


class GraphLadder:
    def __init__(self, model: torch.nn.Module, stager: Stager, query_len: int, max_seqs: int, max_model_len: int,
                 block_size: int, pad_slot: int, pad_page: int, cascade: bool, pool: object,
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
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.ids[:t], self.pos[:t], meta, aux_layers)
                self.graphs[bsz] = (graph, out)
        torch.cuda.synchronize(dev)

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

    def run(self, h: HostInputs, feed: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Replay for the step `h` (every sequence has q tokens); `feed` writes the ids that are already on the
        device (tokens just drawn) into the input ids. Returns the hidden states of the real rows."""
        b, q = len(h.seq_lens), self.q
        size = next(s for s in self.sizes if s >= b)
        pos, slots, lens = self._pad_rows(b, size)
        n = size * q
        st = self.stager
        vec = st.put(h.input_ids + [0] * (n - b * q) + h.positions + pos + h.slots + slots + h.seq_lens + lens + [h.shared])
        tab = st.put_table(h.tables)
        st.upload()
        v = vec()
        self.ids[:n].copy_(v[:n])
        if feed is not None:
            feed(self.ids)
        self.pos[:n].copy_(v[n : 2 * n])
        self.slots[:n].copy_(v[2 * n : 3 * n])
        self.seq_lens[:size].copy_(v[3 * n : 3 * n + size])
        if self.cascade and size > 1:
            self.shared.copy_(v[3 * n + size :])
        t = tab()
        self.tables[:b, : t.shape[1]].copy_(t)
        graph, out = self.graphs[size]
        graph.replay()
        if isinstance(out, tuple):  # the hidden states and the ones an EAGLE-3 head reads
            return tuple(o[: b * q] for o in out)
        return out[: b * q]

