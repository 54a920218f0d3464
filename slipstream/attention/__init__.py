"""Attention backends.

A backend computes attention for a flat batch of query tokens from many sequences over the paged KV pool
(the attention layer stores each step's new keys/values first). The model runner builds one
`AttentionMetadata` per step; layers pass it through untouched. `torch` is the reference (any device);
`triton` is the GPU fast path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


class AttentionBackend(Protocol):
    """Attention of a flat batch of queries over each sequence's pages (the layer has stored the new K/V)."""

    name: str

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hk, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...


def get_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from slipstream.attention.torch_backend import TorchAttention

        return TorchAttention()
    if name == "triton":
        from slipstream.attention.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"attention_backend must be one of: torch, triton; got {name!r}")
