"""Quantization methods for linear layers: how a layer keeps its weight and multiplies by it.

A method has three moments, as in the checkpoint formats it reads: `create_weights` registers the layer's
parameters (each with a `weight_loader` that takes its checkpoint tensor, or one shard of it), `process_after_loading`
turns what was loaded into the form the kernels want (repacking, scales), and `apply` computes x @ W^T (+ b).
Models never see which method a layer uses; a new format (FP8, 4-bit) is a new method here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch-free at import: the engine config lists METHODS without loading torch
    import torch

    from slipstream.layers.linear import Linear

METHODS = ("none",)


class LinearMethod(Protocol):
    # Whether a one-row input may run as the fused GEMV (with the norm or SwiGLU before it) on `layer.weight`.
    supports_gemv: bool

    def create_weights(self, layer: "Linear") -> None: ...

    def process_after_loading(self, layer: "Linear") -> None: ...

    def apply(self, layer: "Linear", x: "torch.Tensor") -> "torch.Tensor": ...


def get_linear_method(name: str) -> LinearMethod:
    if name == "none":
        from slipstream.layers.quantization.unquantized import Unquantized

        return Unquantized()
    raise ValueError(f"quantization must be one of: {', '.join(METHODS)}; got {name!r}")
