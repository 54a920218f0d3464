"""The attention backend interface and the per-step metadata every backend reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.attention.registry import BackendSpec, backend_spec


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: pool slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B+1] int64: sequence b's queries are rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int64: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0  # the first num_decodes sequences have exactly one query token each
    decode_max_len: int = 0  # bound on those sequences' context (max_model_len when a CUDA graph is captured)
    # [1] int64 on the device, or None: the decodes' first shared_prefix[0] context tokens sit in the same pages
    # (sequence 0's), so a backend may attend to them once for all (cascade). Bounded by decode_max_len.
    shared_prefix: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    """Holds the KV pages of every layer; subclasses compute attention over them."""

    spec: BackendSpec

    def __init__(self) -> None:
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    def bind_kv(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Layer i's pools, each [num_pages, page_size, num_kv_heads, head_dim]."""
        self.k_caches, self.v_caches = k_caches, v_caches

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_caches[layer], self.v_caches[layer]

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write the step's new keys/values [T, Hk, D] to their slots."""
        k_cache, v_cache = self.kv_cache(layer)
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """[T, Hq, D] queries -> [T, Hq, D] outputs over each sequence's pages (new K/V already stored)."""
        raise NotImplementedError

