"""Random weights for benchmarks with real shapes and no checkpoint."""
from __future__ import annotations

import zlib

import torch


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights like vLLM's `--load-format dummy`: small uniform values, norms at one. A quantized layer's
    parameters say how to fill them: `dummy_value` (scales), `dummy_scale` (FP8 values spread over their range)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        elif hasattr(p, "dummy_value"):
            p.data.fill_(p.dummy_value)
        else:
            # Drawn where the weights live, in float32 chunks (8B parameters drawn on the host took 53 s before an
            # H200 could start); seeded by name, so a tensor-parallel rank's whole (unsplit) tensors, such as norms
            # and routers, equal the other ranks' whatever the shapes of the split ones drawn before them.
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            flat = p.data.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = torch.empty(min(1 << 24, flat.numel() - start), device=p.device).uniform_(-0.05, 0.05, generator=gen)
                chunk *= getattr(p, "dummy_scale", 1.0)
                flat[start : start + chunk.numel()].copy_(chunk)
