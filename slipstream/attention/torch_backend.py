"""Reference attention: gather each sequence's pages and call torch SDPA. Correct anywhere, fast nowhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slipstream.attention.backend import AttentionBackend, AttentionMetadata, dequantize_kv
from slipstream.attention.registry import BACKENDS


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context (prefix + new tokens);
    `kv_scales`: the pool is FP8 with these per-token, per-head scales."""
    out = torch.empty_like(q) if out is None else out
    block_size = k_cache.shape[1]
    start = 0
    # (the lengths on the device: a step planned behind one whose verdict is not read yet has them moved there)
    for b, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens)):
        blocks = meta.block_tables[b, : -(-ctx // block_size)]
        k, v = k_cache[blocks].flatten(0, 1)[:ctx], v_cache[blocks].flatten(0, 1)[:ctx]
        if kv_scales is not None:
            ks, vs = (s[blocks].flatten(0, 1)[:ctx] for s in kv_scales)
            k, v = dequantize_kv(k, ks, q.dtype), dequantize_kv(v, vs, q.dtype)
        # [1, H, tokens, D]: with a batch axis torch's CPU SDPA takes its flash kernel; 3-D inputs took its plain math,
        # 4-7x slower on a prompt's prefill (a 4,000-token prompt: 29 s on a 2-core CPU)
        k = k.transpose(0, 1).to(q.dtype)[None]
        v = v.transpose(0, 1).to(q.dtype)[None]
        qb = q[start : start + q_len].transpose(0, 1)[None]
        # query i sits at position ctx - q_len + i and sees keys 0..that position (with no cached prefix: the plain
        # causal mask, which SDPA applies without one in memory, twice as fast again)
        mask = None
        # token trees (a tree's step is at most 63 rows): the context before the step, then the rows of the step each
        # row's bits name (-1: the rows up to itself)
        if meta.tree_rows is not None and 1 < q_len <= 63:
            tree = meta.tree_rows[start : start + q_len, None]
            j = torch.arange(q_len, device=q.device)
            seen = torch.where(tree < 0, j[None, :] <= j[:, None], ((tree >> j.clamp(max=63)) & 1).bool())
            mask = torch.cat([torch.ones(q_len, ctx - q_len, dtype=torch.bool, device=q.device), seen], dim=1)
        elif 1 < q_len < ctx:
            rows = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, is_causal=mask is None and 1 < q_len == ctx, scale=scale,
                                           enable_gqa=True)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


class TorchAttention(AttentionBackend):
    spec = BACKENDS["torch"]

    def compute(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache(layer)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, self.kv_scales(layer), out)
