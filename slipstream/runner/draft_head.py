"""Runs a draft head beside the target's runner: an EAGLE-3 head (models/eagle3.py) or an MTP module (models/mtp.py),
each one decoder layer that drafts from the target's hidden states (for EAGLE-3 the states entering three of its
layers, for MTP its final normed state) beside the embedding of the token that follows.

The head's one layer keeps its own KV pool, on the target's page ids (as many pages, one layer's worth each), so the
scheduler's page reservations cover it. After every target step it reads the hidden states the target just computed
(`catch_up`): for each sequence, the positions the step computed whose next token is known, in one forward (a graph
replay where each computed one token); where that reaches the sequence's last token its output there is kept. Once
the next step is scheduled (its slots reserved), `chain` draws the first drafts from those outputs and runs the head
on its own output for the rest, one token per sequence a round (on a GPU in CUDA graphs: a round is a decode-shaped
step, its input tokens and states fed on the device), the draws staying on the device until all rounds are queued. A
step without drafts (the draft policy chose none) costs the head its catch-up alone. Draws use the sampler with the
target's rule and seeds, so where the head's distribution agrees with the target's, so do the draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.attention.registry import create_backend, resolve_backend
from slipstream.config import EngineConfig, ModelConfig
from slipstream.layers.linear import finish_loading
from slipstream.layers.sampler import runners_up, sample
from slipstream.loader.dummy import init_dummy_weights
from slipstream.runner.batch import SamplingRow, SeqStep
from slipstream.runner.cuda_graphs import CapturePool, GraphLadder
from slipstream.runner.device import resolve_device, resolve_dtype
from slipstream.runner.inputs import Stager, eager_inputs, host_inputs
from slipstream.runner.kv_pool import KVPool
from slipstream.runner.sampling import SamplingTensors

from slipstream.runner.model_runner import MAX_GRAPH_SEQS, kv_dtype

if TYPE_CHECKING:
    from slipstream.runner.model_runner import ModelRunner


@dataclass(frozen=True)
class HeadSpec:
    """A draft head to build: `make(backend, fused)` creates its parameters (`forward(ids, positions, meta, g)`,
    `fuse(g)` the target's states as the head's own state input, `compute_logits(o, vocab)`, `attach(target model)`
    to take what it shares), `load(head)` fills them (None: random weights), `layer` is the shape of its attention
    layer (its KV pool). It reads the target's states entering `aux_layers` (EAGLE-3), or with none the target's final
    hidden states (MTP)."""

    name: str  # for the log
    make: Callable[[AttentionBackend, bool], nn.Module]
    load: Callable[[nn.Module], None] | None
    layer: ModelConfig
    aux_layers: tuple[int, ...] = ()


def _create(spec: HeadSpec, backend: AttentionBackend, fused: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return spec.make(backend, fused)
    finally:
        torch.set_default_dtype(default)


def head_footprint(config: EngineConfig, spec: HeadSpec, target: ModelConfig) -> tuple[int, int]:
    """(weight bytes, KV bytes per page) of the head, without building it: what the target's pool leaves room for.
    What it shares with the target (embedding, output head) does not count."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, target, device)
    head = _create(spec, create_backend(resolve_backend(config.attention_backend, device.type)), False,
                   torch.device("meta"), dtype)
    weights = sum(p.numel() * p.element_size() for p in head.parameters())
    pool = KVPool(spec.layer, config.cache.block_size, kv_dtype(config, dtype, device), device)
    return weights, pool.bytes_per_block


class DraftHeadRunner:
    def __init__(self, target: ModelRunner, spec: HeadSpec, seed: int = 0) -> None:
        self.target = target
        dev = self.device = target.device
        self.backend = create_backend(resolve_backend(target.config.attention_backend, dev.type))
        head = _create(spec, self.backend, target.fused, dev, target.dtype)
        if spec.load is None:  # random (benchmarks, tests)
            init_dummy_weights(head, seed)
            finish_loading(head)
        else:
            spec.load(head)
        head.attach(target.model)
        self.head = head.eval()
        self.kv = KVPool(spec.layer, target.block_size, target.kv.kv_dtype, dev)
        self.kv.allocate(target.num_blocks, self.backend)
        sched = target.config.scheduler
        width = -(-target.max_model_len // target.block_size)
        self.ints = Stager(dev, torch.int64, 6 * sched.max_num_batched_tokens + sched.max_num_seqs * (width + 8) + 64)
        self.sampling = SamplingTensors(dev, target.model_config.vocab_size, sorted(target.sampling.eos_ids),
                                        sched.max_num_batched_tokens)
        # The chain's rounds in CUDA graphs (where the target runs its decodes in them): the head's input state is
        # copied into `_g` before a replay
        self.graphs: GraphLadder | None = None
        if target.graphs:
            rows = min(sched.max_num_seqs, MAX_GRAPH_SEQS)
            self._g = torch.zeros(rows, spec.layer.hidden_size, dtype=target.dtype, device=dev)
            self.graphs = GraphLadder(_ChainRound(self.head, self._g), self.ints, 1, rows, target.max_model_len,
                                      target.block_size, self.kv.pad_slot, target.num_blocks, False, CapturePool(dev))
        # After catch_up: per sequence brought to its last token, (row in `_o`, its length then)
        self._first: dict[int, tuple[int, int]] = {}
        self._o: torch.Tensor | None = None  # the head's output at each such sequence's last position

    def has_first(self, seq_id: int, length: int) -> bool:
        """Whether the last catch-up brought this sequence to its last token at its present length (it can draft)."""
        first = self._first.get(seq_id)
        return first is not None and first[1] == length

    @torch.inference_mode()
    def catch_up(self, seqs: list[tuple[int, list[int], list[int], bool]]) -> None:
        """(sequence id, its tokens, block table, whether it drafts on) for the sequences of the target step just
        read: the head computes the positions that step computed whose next token is known, from the target's hidden
        states, and keeps its output at the last token of those it brings there (the first draft's logits are made
        only once a step asks for drafts: where the draft policy chose none, the head's forward is all a step costs,
        and for one-token steps that is a graph replay)."""
        steps = []
        computed, kept = self.target.computed, self.target.kept_rows
        drafting = set()
        offsets = {}  # per sequence, the rows of its states from its first row, position by position
        for seq_id, tokens, table, drafts in seqs:
            where = computed.get(seq_id)
            if where is None or not table:  # not in the step, or its pages already given up
                continue
            _, start, n = where
            offsets[seq_id] = kept.get(seq_id) or range(n)  # (a token tree: its kept drafts' rows)
            end = min(start + len(offsets[seq_id]), len(tokens) - 1)  # position p reads token p + 1
            if end > start:
                steps.append(SeqStep(seq_id, tokens[start + 1 : end + 1], start, table))
                if drafts and end == len(tokens) - 1:
                    drafting.add(seq_id)
        self._first = {}
        if not steps:
            return
        steps.sort(key=lambda s: len(s.token_ids) != 1)  # one-token sequences first: the decode kernel takes them
        st = self.ints
        st.reset()
        h = host_inputs(steps, self.target.block_size, False)
        rows = st.put([computed[s.seq_id][0] + offsets[s.seq_id][i] for s in steps for i in range(len(s.token_ids))])
        drawn = [(i, s) for i, s in enumerate(steps) if s.seq_id in drafting]
        last = st.put([h.first_rows[i] + len(s.token_ids) - 1 for i, s in drawn]) if drawn else None
        if self.graphs is not None and h.num_decodes == len(steps) and self.graphs.fits(len(steps)):
            st.upload()
            self._g[: len(steps)].copy_(self.head.fuse(self.target.head_states[rows()]))  # (the graph reads head-wide states)
            o = self.graphs.run(h)
        else:
            ids, positions, meta = eager_inputs(h, st)
            o = self.head(ids, positions, meta, self.target.head_states[rows()])
        if last is not None:
            self._o = o[last()]  # (a copy: the graph's output buffer serves the next replay)
            self._first = {s.seq_id: (j, s.start + len(s.token_ids) + 1) for j, (_, s) in enumerate(drawn)}

    @torch.inference_mode()
    def chain(self, seqs: list[tuple[int, int, list[int], list[SamplingRow]]],
              alternatives: int = 0) -> tuple[dict[int, list[int]], dict[int, list[list[int]]]]:
        """(sequence id, its length, block table, the draw of each draft) for the scheduled sequences whose last token
        the head has read: the first drafts are drawn from its output there, and the head runs on its own output for
        the drafts after them. Returns each one's drafts and, with `alternatives`, at each draft that many runners-up
        of its draw (-1: none) (one host sync)."""
        order = [(sid, length, table, rows) for sid, length, table, rows in seqs if self.has_first(sid, length)]
        if not order:
            return {}, {}
        st = self.ints
        st.reset()
        first = st.put([self._first[sid][0] for sid, *_ in order])
        st.upload()
        o = self._o[first()]
        rounds = [(order, *self._draw(o, [rows[0] for *_, rows in order], alternatives))]
        for j in range(1, max(len(rows) for *_, rows in order)):
            prev, tokens, _ = rounds[-1]
            keep = [i for i, (*_, rows) in enumerate(prev) if len(rows) > j]
            now = [prev[i] for i in keep]
            st.reset()
            # position length - 2 + j reads draft j (the token at length - 1 + j) beside the head's state before it
            h = host_inputs([SeqStep(sid, [0], length - 2 + j, table) for sid, length, table, _ in now],
                            self.target.block_size, False)
            sel = st.put(keep)
            if self.graphs is not None and self.graphs.fits(len(now)):
                st.upload()
                self._g[: len(now)].copy_(o[sel()])
                # (the ladder hands a feed every staged input; the chain's rows only take the draws as their ids)
                o = self.graphs.run(h, lambda ids, *staged, fed=tokens[sel()]: ids[: len(fed)].copy_(fed))
            else:
                _, positions, meta = eager_inputs(h, st)
                o = self.head(tokens[sel()], positions, meta, o[sel()])
            rounds.append((now, *self._draw(o, [rows[j] for *_, rows in now], alternatives)))
        drafts: dict[int, list[int]] = {sid: [] for sid, *_ in order}
        others: dict[int, list[list[int]]] = {sid: [] for sid, *_ in order} if alternatives else {}
        for seqs_j, tokens, alts in rounds:  # read once every round is queued: the device runs them back to back
            for (sid, *_), t in zip(seqs_j, tokens.tolist()):
                drafts[sid].append(t)
            if alts is not None:
                for (sid, *_), a in zip(seqs_j, alts.tolist()):
                    others[sid].append(a)
        return drafts, others

    def _draw(self, o: torch.Tensor, rows: list[SamplingRow], alternatives: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draws (and their runners-up) from the head's output."""
        logits = self.head.compute_logits(o, self.target.model_config.vocab_size)
        sb = self.sampling.build(rows, [r.num_output_tokens for r in rows], None, self.ints)
        if sb is None:
            tokens = logits.argmax(dim=-1)
            if not alternatives:
                return tokens, None
            return tokens, runners_up(logits, tokens, alternatives, float("-inf"))
        out = sample(logits, sb, self.target.fused, alternatives)
        return out.tokens, out.runners_up


class _ChainRound:
    """A chain round as a graph ladder captures a model: (ids, positions, metadata) -> the head's output, its input
    states read from the static buffer `g`."""

    def __init__(self, head: nn.Module, g: torch.Tensor) -> None:
        self.head, self.g = head, g

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 aux_layers: tuple[int, ...] = ()) -> torch.Tensor:
        return self.head(ids, positions, meta, self.g[: ids.shape[0]])
