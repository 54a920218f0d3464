"""KV-cache block accounting.

The KV pool is `num_blocks` pages of `block_size` token slots (the same page index in every layer). Each
sequence owns a block table: page `i` holds its tokens `[i*block_size, (i+1)*block_size)`. Pages carry a
reference count so that a page can be shared (prefix cache, sibling samples); a page returns to the free list
when its count reaches zero.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slipstream.engine.sequence import Sequence


class BlockManager:
    """Knows which pages are cached (the prefix cache marks them) but not the cache itself: a cached page whose
    only reference is the cache's is evictable, and the scheduler asks the cache to evict before allocating."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: set[int] = set()
        self.num_evictable_blocks = 0  # cached pages with no user but the cache

    @property
    def num_unused_blocks(self) -> int:
        """Pages on the free list."""
        return len(self._free)

    @property
    def num_free_blocks(self) -> int:
        """Pages that can be handed out now: the free list plus cached pages nobody uses (evictable)."""
        return len(self._free) + self.num_evictable_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: "Sequence", num_tokens: int) -> int:
        """New pages `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: "Sequence", num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: "Sequence", num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens from the free list (evict first if it is short)."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def trim(self, seq: "Sequence", num_tokens: int) -> None:
        """Give back the pages past the first `num_tokens` tokens (slots reserved for drafts that were rejected)."""
        keep = -(-num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.release(seq.block_table[keep:])
            del seq.block_table[keep:]

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1
            if self.ref_counts[b] == 2 and b in self._cached:
                self.num_evictable_blocks -= 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} released twice"
            if self.ref_counts[b] == 0:
                self._free.append(b)
            elif self.ref_counts[b] == 1 and b in self._cached:
                self.num_evictable_blocks += 1

    def mark_cached(self, block: int) -> None:
        """The prefix cache took a reference on `block` (with `share`) and now keeps it."""
        self._cached.add(block)
        if self.ref_counts[block] == 1:
            self.num_evictable_blocks += 1

    def uncache(self, block: int) -> None:
        """The prefix cache drops `block` and its reference."""
        self._cached.discard(block)
        if self.ref_counts[block] == 1:
            self.num_evictable_blocks -= 1
        self.release([block])

    def free(self, seq: "Sequence") -> None:
        """Drop `seq`'s references to its pages (pages shared with the prefix cache stay cached)."""
        self.release(seq.block_table)
        seq.block_table = []

    def check_consistency(self) -> None:
        """Every page is either free (count 0, on the free list once) or referenced; used by tests."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert (self.ref_counts[b] == 0) == (b in free), f"block {b}: ref {self.ref_counts[b]} vs free list"
        assert self.num_evictable_blocks == sum(1 for b in self._cached if self.ref_counts[b] == 1)
