"""Attention backends.

A backend owns the paged KV pool of every layer: the model runner sizes the pool and hands the backend its
tensors (`bind_kv`); attention layers store each step's new K/V through it and then attend over the pages.
It computes attention for a flat batch of query tokens from many sequences. The model runner builds one
`AttentionMetadata` per step; layers pass it through untouched. `torch` is the reference (any device);
`triton` is the GPU fast path. What each supports is declared in `registry.py` (torch-free);
the interface and per-step metadata are in `backend.py`.
"""
