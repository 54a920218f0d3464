"""Reference attention: gather each sequence's pages and call torch SDPA. Correct anywhere, fast nowhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.attention import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context (prefix + new tokens)."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    start = 0
    for b, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_tables[b, : -(-ctx // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hk, ctx, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        qb = q[start : start + q_len].transpose(0, 1)  # [Hq, q_len, D]
        # query i sits at position ctx - q_len + i and sees keys 0..that position
        mask = None
        if q_len > 1:
            rows = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


class TorchAttention:
    name = "torch"

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
