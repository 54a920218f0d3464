"""The attention backend interface and the per-step metadata every backend reads."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from slipstream.attention.registry import BackendSpec, backend_spec


FP8_MAX = 448.0  # the largest finite float8 E4M3 value


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [T, Hk, D] -> (float8 E4M3 values, float32 scales [T, Hk]) with x ~ q * scale, scale = amax / 448 per
    row (1 for a zero row); the reference of the fused store kernel (kernels/rope.py)."""
    x = x.float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def dequantize_kv(pages: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pages of FP8 rows [..., Hk, D] and their scales [..., Hk] -> values in `dtype`."""
    return (pages.float() * scales.unsqueeze(-1)).to(dtype)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: pool slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B+1] int64: sequence b's queries are rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int64: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64
    query_lens_cpu: list[int]
    # Bounds, not the lengths: a step planned behind one whose drafts are not counted yet has its lengths moved back
    # on the device (runner/inputs.Feed); a backend reads the lengths from seq_lens
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0  # the first num_decodes sequences have exactly one query token each
    decode_max_len: int = 0  # bound on those sequences' context (max_model_len when a CUDA graph is captured)
    # [1] int64 on the device, or None: the decodes' first shared_prefix[0] context tokens sit in the same pages
    # (sequence 0's), so a backend may attend to them once for all (cascade). Bounded by decode_max_len.
    shared_prefix: torch.Tensor | None = None
    # [T] int64 on the device, or None where no sequence verifies a token tree: per query row, the rows of its
    # sequence's step it attends to as bits (bit j: the key at context length - query length + j; a draft sees its
    # ancestors, runner/inputs.ancestor_masks), or -1 for a causal row
    tree_rows: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @cached_property
    def context_lens(self) -> list[int]:
        """seq_lens as the device holds them, read once a step (for a backend that loops over sequences on the host)."""
        return self.seq_lens.tolist()


class AttentionBackend:
    """Holds the KV pages of every layer; subclasses compute attention over them."""

    spec: BackendSpec

    def __init__(self) -> None:
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] | None = None
        # Set only while runner/cuda_graphs.py captures a model in pieces: it takes each layer's attention call, which
        # then runs eagerly between the captured pieces (its shape depends on the step's sequences).
        self.cut: Callable[[int, torch.Tensor, float], torch.Tensor] | None = None

    def bind_kv(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                scales: list[torch.Tensor] | None = None) -> None:
        """Layer i's pools, each [num_pages, page_size, num_kv_heads, head_dim]; an FP8 pool's scales [num_pages,
        page_size, num_kv_heads] (float32), the layers' K scales then their V scales."""
        self.k_caches, self.v_caches, self.scales = k_caches, v_caches, scales

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_caches[layer], self.v_caches[layer]

    def kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An FP8 pool's (K scales, V scales) of a layer; None for a 16/32-bit pool."""
        return None if self.scales is None else (self.scales[layer], self.scales[len(self.k_caches) + layer])

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write the step's new keys/values [T, Hk, D] to their slots (FP8: each row with its own scale)."""
        k_cache, v_cache = self.kv_cache(layer)
        scales = self.kv_scales(layer)
        for x, cache, scale in zip((k, v), (k_cache, v_cache), scales or (None, None)):
            rows = cache.view(-1, *cache.shape[2:])
            if scale is None:
                rows.index_copy_(0, meta.slot_mapping, x.to(cache.dtype))
            else:  # as bytes: index_copy_ has no float8 kernel on the CPU
                x, s = quantize_kv(x)
                rows.view(torch.uint8).index_copy_(0, meta.slot_mapping, x.view(torch.uint8))
                scale.view(-1, scale.shape[2]).index_copy_(0, meta.slot_mapping, s)

    def move_kv(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's keys and values (and scales) at slots `src` to slots `dst` (int64 tensors on the pool's
        device): read whole before any is written, so the two may overlap."""
        pools = self.k_caches + self.v_caches + (self.scales or [])
        for pool in pools:
            rows = pool.view(-1, *pool.shape[2:])
            if rows.dtype == torch.float8_e4m3fn:  # as bytes: index_copy_ has no float8 kernel on the CPU
                rows = rows.view(torch.uint8)
            rows.index_copy_(0, dst, rows.index_select(0, src))

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """[T, Hq, D] queries -> [T, Hq, D] outputs over each sequence's pages (new K/V already stored): what a model
        calls."""
        if self.cut is not None:
            return self.cut(layer, q, scale)
        return self.compute(layer, q, meta, scale, torch.empty_like(q))

    def compute(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> torch.Tensor:
        """`attend` into `out` (rows of `q`'s shape); returns `out`."""
        raise NotImplementedError

