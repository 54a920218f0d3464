"""Radix-tree prefix cache over KV pages (RadixAttention), shared across requests.

Granularity: one edge per full KV page (block_size tokens). A KV page is the unit the attention kernels
read and the allocator hands out, so sharing at finer granularity would need copy-on-write of partial pages;
at page granularity a cache hit is just the same page id in two block tables. Path compression would merge
runs of single-child pages into one edge, but matching costs one dict lookup per page either way and
eviction works page by page, so each page stays its own node.

Ownership: the tree holds one reference on each cached page (BlockManager ref counts). A page that a running
or waiting sequence also references has a count above one: it is locked and never evicted. Unreferenced
leaves are evicted in LRU order, only when the allocator runs short. A sequence's pages are cached only below
pages it holds itself, and a sequence that uses a page also uses every page on the path above it, so a parent is
never less referenced than its children, and evicting leaves first can reclaim every unreferenced page.

A match never covers a prompt's last token: its logits must be computed to sample the first output token.

With a draft head (EAGLE-3, MTP) a page's KV is not a function of its tokens alone: the head's layer reads each
position's hidden state beside the token after it, so the head's KV at a page's last position depends on the token
that followed the page in the sequence that computed it. Such a tree (`next_token_in_kv`) keys each page by its tokens
and that token, so a page serves only sequences with the same token after it (elsewhere the head would attend to an
entry made for another continuation), and two continuations of a page are two branches. A prompt's last page is
keyed with no next token until its sequence draws one (it serves nobody meanwhile); its next insert re-keys it.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slipstream.engine.block_manager import BlockManager
    from slipstream.engine.sequence import Sequence


# A page's tokens; with a draft head, (its tokens, the token after it or None)
Key = tuple


@dataclass(eq=False)
class _Node:
    key: Key
    block: int
    parent: "_Node | None"
    children: dict[Key, "_Node"] = field(default_factory=dict)
    last_access: int = 0


@dataclass
class PrefixCacheStats:
    query_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class RadixCache:
    def __init__(self, block_manager: "BlockManager", next_token_in_kv: bool = False) -> None:
        self.bm = block_manager
        self.next_token_in_kv = next_token_in_kv
        self.block_size = block_manager.block_size
        self.root = _Node((), -1, None)
        self.nodes: dict[int, _Node] = {}  # block id -> node
        self.stats = PrefixCacheStats()
        self._clock = itertools.count(1)

    def _keys(self, tokens: list[int], limit: int) -> list[Key]:
        """The keys of the full pages among tokens[:limit]."""
        bs = self.block_size
        pages = [tuple(tokens[i * bs : (i + 1) * bs]) for i in range(limit // bs)]
        if not self.next_token_in_kv:
            return pages
        return [(page, tokens[end] if (end := (i + 1) * bs) < len(tokens) else None) for i, page in enumerate(pages)]

    def _walk(self, tokens: list[int]) -> list[_Node]:
        """Nodes along the longest cached prefix of `tokens`, stopping short of the last token."""
        path, node = [], self.root
        for key in self._keys(tokens, len(tokens) - 1):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def peek_match_len(self, tokens: list[int]) -> int:
        return len(self._walk(tokens)) * self.block_size

    def match(self, seq: "Sequence") -> None:
        """Give a sequence with nothing computed the cached pages of its longest cached prefix."""
        assert seq.num_computed_tokens == 0 and not seq.block_table
        path = self._walk(seq.token_ids)
        now = next(self._clock)
        for node in path:
            node.last_access = now
        blocks = [n.block for n in path]
        self.bm.share(blocks)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.num_cached_tokens = len(blocks) * self.block_size

    def note_admitted(self, seq: "Sequence") -> None:
        self.stats.query_tokens += seq.num_tokens
        self.stats.hit_tokens += seq.num_cached_tokens

    def insert(self, seq: "Sequence") -> None:
        """Cache the full pages whose KV `seq` has computed (called after prefill chunks and at the end)."""
        node, now = self.root, next(self._clock)
        for i, key in enumerate(self._keys(seq.token_ids, seq.num_computed_tokens)):
            child = node.children.get(key)
            block = seq.block_table[i]
            if child is None and self.next_token_in_kv and key[1] is not None:
                pending = node.children.get((key[0], None))
                if pending is not None and pending.block == block:  # this sequence's prompt end, its next token drawn
                    del node.children[pending.key]
                    child, pending.key = pending, key
                    node.children[key] = child
            if child is not None and child.block != block:
                # The tree holds another page for these tokens (this sequence scored its prompt, so it did not take
                # the cached pages; or another computed the same tokens beside it). Its later pages stay uncached:
                # below a page it does not hold they could outlive that page's users, which would leave the page
                # counted as evictable while eviction (leaves first) cannot reach it.
                break
            if child is None:
                assert block not in self.nodes, f"page {block} already caches another prefix"
                self.bm.share([block])  # the tree's own reference
                self.bm.mark_cached(block)
                child = _Node(key, block, node)
                node.children[key] = child
                self.nodes[block] = child
            child.last_access = now
            node = child

    @property
    def num_evictable_blocks(self) -> int:
        return self.bm.num_evictable_blocks

    def evict(self, num_blocks: int) -> int:
        """Free up to `num_blocks` unreferenced pages, least recently used leaves first."""
        rc = self.bm.ref_counts
        heap = [(n.last_access, id(n), n) for n in self.nodes.values() if not n.children and rc[n.block] == 1]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._remove(node)
            freed += 1
            if parent is not self.root and not parent.children and rc[parent.block] == 1:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.stats.evicted_blocks += freed
        return freed

    def _remove(self, node: _Node) -> None:
        del node.parent.children[node.key]
        del self.nodes[node.block]
        self.bm.uncache(node.block)

    def clear(self) -> int:
        """Drop every cached page that no sequence uses; returns how many were freed."""
        return self.evict(len(self.nodes))
