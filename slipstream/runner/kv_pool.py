"""The paged KV pool: how many pages fit, and the per-layer tensors handed to the attention backend.

The pool is `num_blocks + 1` pages per layer for K and for V: the extra page takes the writes of padded rows
in a CUDA graph. Its dtype (`kv_dtype`) is the pool's own, apart from the model's compute dtype. An FP8 pool
(float8 E4M3) has beside each layer's K and V pages their scales, one float32 per token and KV head
([pages, page_size, Hk]): the row of a key or value is stored as x / scale with scale = its amax / 448.
"""
from __future__ import annotations

from typing import Callable

import torch

from slipstream.attention.backend import AttentionBackend
from slipstream.config import CacheConfig, ModelConfig

_CPU_KV_BYTES = 1 << 30  # default KV budget on CPU


class KVPool:
    def __init__(self, model: ModelConfig, block_size: int, kv_dtype: torch.dtype, device: torch.device,
                 num_kv_heads: int | None = None) -> None:
        """`num_kv_heads`: the heads this pool holds (a tensor-parallel rank's; default: the model's)."""
        self.model, self.block_size, self.kv_dtype, self.device = model, block_size, kv_dtype, device
        self.num_kv_heads = num_kv_heads or model.num_kv_heads
        self.num_blocks = 0

    @property
    def scaled(self) -> bool:
        return self.kv_dtype == torch.float8_e4m3fn

    @property
    def bytes_per_block(self) -> int:
        m = self.model
        row = m.head_dim * self.kv_dtype.itemsize + (4 if self.scaled else 0)  # + its float32 scale
        return 2 * m.num_layers * self.block_size * self.num_kv_heads * row

    @property
    def pad_slot(self) -> int:
        """First slot of the padding page (after the pages the block manager hands out)."""
        return self.num_blocks * self.block_size

    def size(self, cache: CacheConfig, max_model_len: int, max_num_seqs: int, free_bytes: Callable[[], int],
             shared_page_bytes: int = 0) -> int:
        """Pages to allocate: the exact override, else what the byte budget holds (no more than can ever be used).
        `shared_page_bytes`: what another pool with the same page ids (a draft model's) spends per page."""
        useful = max_num_seqs * -(-max_model_len // self.block_size)
        if cache.num_blocks is not None:
            n = cache.num_blocks
        else:
            if cache.kv_cache_bytes is not None:
                budget = cache.kv_cache_bytes
            elif self.device.type == "cuda":
                budget = free_bytes()
            else:
                budget = _CPU_KV_BYTES
            n = min(useful, max(budget // (self.bytes_per_block + shared_page_bytes) - 1, 0))  # and the padding page
        if n * self.block_size < max_model_len:
            raise ValueError(
                f"KV cache of {n} blocks x {self.block_size} tokens ({self.bytes_per_block + shared_page_bytes} bytes "
                f"a block) cannot hold one sequence of max_model_len={max_model_len}; lower max_model_len or "
                + ("raise num_blocks" if cache.num_blocks is not None else "give the cache more memory")
            )
        return n

    def allocate(self, num_blocks: int, backend: AttentionBackend) -> None:
        """Zeros where the backend's kernels read past a context (the Hopper prefill kernel loads whole key tiles and
        cancels the slots past a context with P = 0, which needs them finite); else left as allocated, so a CPU
        touches only the pages it writes (zeroing the 1 GiB CPU pool cost 1.9 s of a 7.5 s start)."""
        self.num_blocks = num_blocks
        m = self.model
        shape = (num_blocks + 1, self.block_size, self.num_kv_heads, m.head_dim)
        alloc = torch.zeros if backend.spec.reads_past_context else torch.empty
        pages = [alloc(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2 * m.num_layers)]
        scales = [alloc(shape[:3], dtype=torch.float32, device=self.device) for _ in range(2 * m.num_layers)] if self.scaled else None
        backend.bind_kv(pages[: m.num_layers], pages[m.num_layers :], scales)

    def bind_scratch(self, num_blocks: int, backend: AttentionBackend) -> int:
        """One scratch page set shared by every layer (for measuring activation memory before the pool exists), held
        by the backend until it is bound again; returns its bytes."""
        m = self.model
        tmp = torch.empty((num_blocks, self.block_size, self.num_kv_heads, m.head_dim), dtype=self.kv_dtype, device=self.device)
        scales = None
        if self.scaled:
            scales = [torch.empty((num_blocks, self.block_size, self.num_kv_heads), dtype=torch.float32, device=self.device)] * (2 * m.num_layers)
        backend.bind_kv([tmp] * m.num_layers, [tmp] * m.num_layers, scales)
        return num_blocks * self.bytes_per_block // (2 * m.num_layers)  # one page set of K = V, and one of scales
