"""What each attention backend supports, declared in one place and checked when the engine config is built.

Torch-free, so that a config (CLI, server front end) is validated without importing torch or Triton; the
backend implementations are imported only when the model runner creates one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    implementation: str  # "module:Class", imported when a runner creates the backend
    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[str, ...]  # compute dtypes; the KV pool holds the same
    block_sizes: tuple[int, ...] | None  # KV page sizes in tokens; None: any
    # K and V are separate pools of pages [num_pages, page_size, num_kv_heads, head_dim], one per layer.
    kv_layout: str = "paged NHD"
    # Whether kernels read slots past a context (and cancel them with a zero weight, so they must hold finite
    # values: the pool is zero-filled); otherwise the pool is left as allocated, touched only where written.
    reads_past_context: bool = False

    def check_block_size(self, block_size: int) -> None:
        if block_size < 1 or (self.block_sizes is not None and block_size not in self.block_sizes):
            allowed = "any positive integer" if self.block_sizes is None else ", ".join(map(str, self.block_sizes))
            raise ValueError(f"block_size {block_size} is not supported by attention backend {self.name!r}; "
                             f"allowed: {allowed}")

    def check_runtime(self, device_type: str, dtype: str | None = None) -> None:
        """`dtype` None: not known yet (the model's config decides 'auto'), only the device is checked."""
        if device_type not in self.devices:
            raise ValueError(f"attention_backend {self.name!r} needs a {' or '.join(self.devices)} device, not {device_type}")
        if dtype is not None and dtype not in self.dtypes:
            raise ValueError(f"attention_backend {self.name!r} does not run dtype {dtype}; supported: {', '.join(self.dtypes)}")


BACKENDS = {
    # The reference: gathers pages and calls SDPA. Any device, dtype and page size.
    "torch": BackendSpec("torch", "slipstream.attention.torch_backend:TorchAttention", ("cpu", "cuda"), COMPUTE_DTYPES, None),
    # Triton kernels (Hopper: a Gluon prefill). Pages of 16..256 tokens, a power of two: the decode kernel's key
    # tiles and Hopper's bulk copies (TMA) take whole pages or split them evenly.
    # Its prefill kernels load whole key tiles.
    "triton": BackendSpec("triton", "slipstream.attention.triton_backend:TritonAttention", ("cuda",), COMPUTE_DTYPES,
                          (16, 32, 64, 128, 256), reads_past_context=True),
}


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of: auto, {', '.join(BACKENDS)}; got {name!r}")
    return BACKENDS[name]


def resolve_backend(name: str, device_type: str) -> BackendSpec:
    """'auto' -> triton on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if device_type == "cuda" else "torch"
    return backend_spec(name)


def create_backend(spec: BackendSpec) -> Any:
    """A fresh backend instance (an `attention.backend.AttentionBackend`) with no KV pool bound yet."""
    module, name = spec.implementation.split(":")
    return getattr(importlib.import_module(module), name)()
