"""GPU attention: split-KV decode kernel for the batch's leading one-token sequences, varlen prefill kernel
(with cached prefix) for the rest, both reading the paged pool directly."""
from __future__ import annotations

import torch

from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.attention.registry import BACKENDS
from slipstream.kernels.attention import decode_splits, paged_decode, paged_prefill


class TritonAttention(AttentionBackend):
    spec = BACKENDS["triton"]

    def __init__(self) -> None:
        super().__init__()
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if torch.cuda.is_available() else 1

    def compute(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache(layer)
        scales = self.kv_scales(layer)
        nd = meta.num_decodes
        if nd:
            splits = decode_splits(nd, k_cache.shape[2], meta.decode_max_len, self.num_sms)
            paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], splits, scale,
                         out=out[:nd], shared=meta.shared_prefix, shared_bound=meta.decode_max_len, kv_scales=scales)
        if nd < meta.num_seqs:
            paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                          scale, out=out, first_seq=nd, kv_scales=scales, tree_rows=meta.tree_rows)
        return out
