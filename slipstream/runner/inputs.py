"""A step's inputs: host lists from the plain-data step, then device tensors staged in one upload."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from slipstream.attention.backend import AttentionMetadata
from slipstream.runner.batch import SeqStep, tree_depths

_MIN_SHARED = 256  # shorter common prefixes are not worth the cascade kernel's launch


@dataclass
class HostInputs:
    """One step on the host. Sequences with one token (decodes) come first: the backend's decode kernel takes them."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]  # pool slot of each token
    query_lens: list[int]
    seq_lens: list[int]  # context length of each sequence after this step
    tables: list[list[int]]
    sample_rows: list[int]  # rows of the hidden states to turn into logits, in sequence order
    first_rows: list[int]  # row of each sequence's first token
    num_decodes: int
    shared: int  # cascade: context tokens every decode reads from the same pages (0: none)
    # Token trees: per sequence, None (causal) or per row of its tokens the rows of the step it attends to (bit j: its
    # row j; a draft sees the tokens before the drafts, its ancestors and itself); None where no sequence has a tree
    trees: list[list[int] | None] | None = None


def host_inputs(seqs: list[SeqStep], block_size: int, cascade: bool) -> HostInputs:
    bs = block_size
    if all(len(s.token_ids) == 1 for s in seqs):  # a decode step: list comprehensions, no per-token loop
        pos = [s.start for s in seqs]
        tables = [s.block_table for s in seqs]
        lens = [p + 1 for p in pos]
        n = len(seqs)
        return HostInputs([s.token_ids[0] for s in seqs], pos, [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)],
                          [1] * n, lens, tables, [i for i, s in enumerate(seqs) if s.sampling is not None], list(range(n)),
                          n, shared_prefix_len(tables, lens, bs) if cascade else 0)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    rows: list[int] = []
    first: list[int] = []
    trees: list[list[int] | None] | None = None
    for i, s in enumerate(seqs):
        end = s.start + len(s.token_ids)
        first.append(len(ids))
        ids += s.token_ids
        if s.draft_parents is None:
            positions += range(s.start, end)
        else:  # a draft stands at its depth past the last token before the drafts; its KV goes to its own slot
            last = end - s.num_drafts - 1
            positions += range(s.start, last + 1)
            positions += [last + d for d in tree_depths(s.draft_parents)]
            trees = trees or [None] * len(seqs)
            trees[i] = ancestor_masks(len(s.token_ids) - s.num_drafts, s.draft_parents)
        table = s.block_table
        slots += [table[p // bs] * bs + p % bs for p in range(s.start, end)]
        seq_lens.append(end)
        rows += range(len(ids) - s.num_samples, len(ids))
    num_decodes = 0
    while num_decodes < len(seqs) and len(seqs[num_decodes].token_ids) == 1:
        num_decodes += 1
    tables = [s.block_table for s in seqs]
    shared = shared_prefix_len(tables[:num_decodes], seq_lens[:num_decodes], bs) if cascade else 0
    return HostInputs(ids, positions, slots, [len(s.token_ids) for s in seqs], seq_lens, tables, rows, first, num_decodes,
                      shared, trees)


def ancestor_masks(num_real: int, parents: list[int]) -> list[int]:
    """Per row of a sequence's step (`num_real` tokens, then its drafts), the rows it attends to as bits: a real token
    the ones up to itself (causal), a draft the real tokens, its ancestors and itself."""
    masks = [(2 << r) - 1 for r in range(num_real)]
    for i, p in enumerate(parents):
        masks.append(masks[num_real + p] | 1 << (num_real + i))  # (p = -1: the last real token's row)
    return masks


def front_padded(h: HostInputs, q: int, pad_slot: int, slack: int = 0) -> HostInputs | None:
    """The step with every sequence's tokens padded in front to `q`, so that it replays the graph ladder captured for q
    tokens a sequence (a verifying step whose sequences check different numbers of drafts, or decodes beside them),
    not pieces with the attention launched eagerly between them; None where a sequence computes more than q tokens or
    has fewer than q tokens of context.

    The attention reads a row's position as its sequence's context length minus the rows after it, so a sequence's
    real tokens, the last of its q rows, keep their positions and see what they saw. A padding row stands at one of
    the q - n positions before them, which the cache already holds: it attends to the sequence's own past, writes its
    key and value to the pad page (the cache keeps the real ones), and no row is drawn from it. `slack`: how far a
    sequence's context may yet move back on the device (a `Feed`'s rejected drafts); it keeps q tokens all the same.
    (A token tree's rows are not padded: the ladders' kernels have no tree mask.)"""
    if h.trees is not None or any(n > q for n in h.query_lens) or any(end < q + slack for end in h.seq_lens):
        return None
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    first: list[int] = []
    moved = [0] * len(h.input_ids)  # each real row's new index
    for n, end, at in zip(h.query_lens, h.seq_lens, h.first_rows):
        pad = q - n
        first.append(len(ids) + pad)
        moved[at : at + n] = range(len(ids) + pad, len(ids) + q)
        ids += [0] * pad + h.input_ids[at : at + n]
        positions += range(end - q, end)
        slots += [pad_slot + i for i in range(pad)] + h.slots[at : at + n]
    return HostInputs(ids, positions, slots, [q] * len(h.query_lens), h.seq_lens, h.tables,
                      [moved[r] for r in h.sample_rows], first, 0, 0)


class Feed:
    """What a step takes from the step launched just before it, whose results are still on the device: the tokens it
    drew, fed to the sequences that continue from them, and for a sequence whose drafts it verified, how many it
    accepted. The host plans a step behind a verifying one as if every draft were accepted (engine/core.py); each one
    rejected moves this step's tokens one position back: their positions, KV slots and the sequence's context length,
    the output index of its draws (seeded sampling's noise follows it), and the fed token is the draw that follows the
    last accepted draft."""

    def __init__(self, st: Stager, tokens: torch.Tensor, block_size: int, plain: list[tuple[int, int]],
                 moved: list[Moved]) -> None:
        """`tokens`: the earlier step's draws, one row each. `plain`: (row of a fed token here, row of its draw)."""
        self.tokens, self.bs = tokens, block_size
        self.plain = (st.put([d for d, _ in plain]), st.put([s for _, s in plain])) if plain else None
        self.moved: _MovedStaged | None = None
        self.back: torch.Tensor | None = None  # drafts rejected, per moved sequence (once called)
        if moved:
            width, last = max(len(m.drafts) for m in moved), tokens.shape[0] - 1
            # draft j of a sequence against its draw j (a sentinel, -1, pads the shorter lists: no draw equals it)
            draws = [min(m.draw + j, last) for m in moved for j in range(width)]
            drafts = [t for m in moved for t in m.drafts + [-1] * (width - len(m.drafts))]
            rows = [(m.row + i, j) for j, m in enumerate(moved) for i in range(m.num_tokens)]
            drawn = [(m.drawn + i, j) for j, m in enumerate(moved) for i in range(m.num_drawn)]
            self.moved = _MovedStaged(
                len(moved), width, st.put(draws), st.put(drafts), st.put([m.draw for m in moved]),
                st.put([len(m.drafts) for m in moved]), st.put([m.row for m in moved]),
                st.put([m.index for m in moved]), st.put([r for r, _ in rows]), st.put([j for _, j in rows]),
                st.put([r for r, _ in drawn]), st.put([j for _, j in drawn]))
        st.upload()

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
                 tables: torch.Tensor) -> None:
        """Write into a step's staged inputs (in place, on the device)."""
        if self.plain is not None:
            dst, src = self.plain
            ids.index_copy_(0, dst(), self.tokens[src()])
        if self.moved is None:
            return
        mv = self.moved
        n, w = mv.count, mv.width
        accepted = (self.tokens[mv.draws()].view(n, w) == mv.drafts().view(n, w)).long().cumprod(1).sum(1)
        ids.index_copy_(0, mv.fed_rows(), self.tokens[mv.first_draws() + accepted])
        self.back = back = mv.num_drafts() - accepted
        rows_t, owner_t = mv.token_rows(), mv.token_owners()
        pos.index_add_(0, rows_t, -back[owner_t])
        seq_lens.index_add_(0, mv.seqs(), -back)
        p = pos[rows_t]
        slots.index_copy_(0, rows_t, tables[mv.seqs()[owner_t], p // self.bs] * self.bs + p % self.bs)

    def move_draws(self, output_index: torch.Tensor) -> None:
        """Move the output index of the moved sequences' draws (one per drawn row) back as their positions moved."""
        if self.back is not None:
            output_index.index_add_(0, self.moved.drawn_rows(), -self.back[self.moved.drawn_owners()])


class _MovedStaged(NamedTuple):
    """The moved sequences' lists as Feed stages them (each a Stager handle: called, the uploaded tensor)."""

    count: int  # moved sequences
    width: int  # the most drafts any of them verified
    draws: Callable[[], torch.Tensor]  # per sequence, `width` rows of the earlier step's draws (clamped)
    drafts: Callable[[], torch.Tensor]  # per sequence, its drafts padded to `width` with -1
    first_draws: Callable[[], torch.Tensor]  # per sequence, the row of its first draw there
    num_drafts: Callable[[], torch.Tensor]
    fed_rows: Callable[[], torch.Tensor]  # per sequence, the row of its first token here
    seqs: Callable[[], torch.Tensor]  # per sequence, its index among this step's sequences
    token_rows: Callable[[], torch.Tensor]  # every row of their tokens here ...
    token_owners: Callable[[], torch.Tensor]  # ... and whose it is
    drawn_rows: Callable[[], torch.Tensor]  # every row of their draws here ...
    drawn_owners: Callable[[], torch.Tensor]  # ... and whose it is


class Moved(NamedTuple):
    """A sequence fed after drafts the step before verified."""

    draw: int  # the row of its first draw there
    drafts: list[int]
    row: int  # the row of its first token here
    index: int  # its index among this step's sequences
    num_tokens: int  # its tokens here
    drawn: int  # the first of the rows drawn here that are its (in draw order)
    num_drawn: int


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


def eager_inputs(h: HostInputs, st: "Stager", pad: int = 0, pad_slot: int = 0) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Stage the step's inputs in one upload: (input ids, positions, attention metadata). `pad` rows more of ids,
    positions and slots (token 0 at position 0, written to `pad_slot`) round the step up to a captured size."""
    qsl = [0]
    for n in h.query_lens:
        qsl.append(qsl[-1] + n)
    ids, positions, slots = h.input_ids, h.positions, h.slots
    if pad:  # (copies of the step's lists only when there is padding to add)
        ids, positions, slots = ids + [0] * pad, positions + [0] * pad, slots + [pad_slot] * pad
    ids_t, pos_t, slots_t = st.put(ids), st.put(positions), st.put(slots)
    qsl_t, lens_t = st.put(qsl), st.put(h.seq_lens)
    shared_t = st.put([h.shared]) if h.shared else None
    tree_t = None
    if h.trees is not None:  # (a padding row is causal)
        tree_t = st.put([m for n, rows in zip(h.query_lens, h.trees) for m in rows or [-1] * n] + [-1] * pad)
    tables_t = st.put_table(h.tables)
    st.upload()
    nd = h.num_decodes
    meta = AttentionMetadata(
        slot_mapping=slots_t(), query_start_loc=qsl_t(), seq_lens=lens_t(), block_tables=tables_t(),
        query_lens_cpu=h.query_lens, seq_lens_cpu=h.seq_lens, max_query_len=max(h.query_lens), max_seq_len=max(h.seq_lens),
        num_decodes=nd, decode_max_len=max(h.seq_lens[:nd], default=0), shared_prefix=shared_t() if shared_t else None,
        tree_rows=tree_t() if tree_t else None,
    )
    return ids_t(), pos_t(), meta


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
