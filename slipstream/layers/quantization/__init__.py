"""Quantization methods for linear layers: how a layer keeps its weight and multiplies by it.

A method has three moments, as in the checkpoint formats it reads: `create_weights` registers the layer's
parameters (each with a `weight_loader` that takes its checkpoint tensor, or one shard of it), `process_after_loading`
turns what was loaded into the form the kernels want (repacking, scales), and `apply` computes x @ W^T (+ b).
Models never see which method a layer uses; a new format (FP8, 4-bit) is a new method here.

`QuantSpec` (spec.py) says what a model's linear layers hold; `method_table` turns it into each layer's method.
This module stays torch-free: the engine config lists METHODS and parses specs without loading torch.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Protocol

from slipstream.layers.quantization.spec import METHODS, QuantSpec, parse_quantization_config, resolve_quantization

if TYPE_CHECKING:
    import torch

    from slipstream.layers.linear import Linear

__all__ = ["METHODS", "LinearMethod", "QuantSpec", "get_linear_method", "method_table", "parse_quantization_config",
           "resolve_quantization"]


OUTPUT_HEAD = "lm_head"  # the output projection's prefix


class LinearMethod(Protocol):
    # Whether a one-row input may run as the fused GEMV (with the norm or SwiGLU before it).
    supports_gemv: bool

    def create_weights(self, layer: "Linear") -> None: ...

    def process_after_loading(self, layer: "Linear") -> None: ...

    def apply(self, layer: "Linear", x: "torch.Tensor") -> "torch.Tensor": ...

    def gemv(self, layer: "Linear", x: "torch.Tensor", **prologue: Any) -> "tuple[torch.Tensor, torch.Tensor | None]": ...


def get_linear_method(spec: QuantSpec | str = "none", bits: int = 4) -> LinearMethod:
    """`bits`: int4's integers are 8-bit in this layer (GGUF blocks of 5 to 8 bits)."""
    method = spec if isinstance(spec, str) else spec.method
    if method == "none":
        from slipstream.layers.quantization.unquantized import Unquantized

        return Unquantized()
    if method == "fp8" and isinstance(spec, QuantSpec):
        from slipstream.layers.quantization.fp8 import Fp8

        return Fp8(spec)
    if method == "int4" and isinstance(spec, QuantSpec):
        from slipstream.layers.quantization.int4 import Int4

        return Int4(spec, bits)
    raise ValueError(f"no linear method for quantization {method!r}")


def method_table(spec: QuantSpec, checkpoint_names: Callable[[str], list[str]],
                 quantize_head: bool = False) -> Callable[[str], LinearMethod]:
    """prefix of a layer ("layers.0.mlp.gate_up_proj") -> its method; `checkpoint_names` lists the checkpoint
    modules fused into that layer, which the spec's ignore list names. The output head stays 16-bit (its error
    lands on every logit) unless stored in 8-bit blocks (GGUF), or `quantize_head` rounds it at load to the run's
    format (FP8 per output row, or 4-bit groups, as `--quantization fp8|int4` rounds a 16-bit checkpoint)."""
    if quantize_head and spec.method == "none":
        raise ValueError("quantize_lm_head rounds the output head to the run's weight format, and this run's weights "
                         "are 16-bit: use it with quantization fp8 or int4, or with a checkpoint that holds FP8 or "
                         "4-bit weights (a GGUF file loads 16-bit unless quantization is int4)")

    def method_for(prefix: str) -> LinearMethod:
        names = checkpoint_names(prefix)
        if prefix == OUTPUT_HEAD:
            if spec.keeps_8bit(names):
                return get_linear_method(spec, 8)
            return get_linear_method(resolve_quantization(spec.method, QuantSpec()) if quantize_head else "none")
        if spec.keeps_16bit(names):
            return get_linear_method("none")
        if spec.rounds(names):  # 16-bit in the checkpoint: rounded to 4 bits once loaded (groups as the spec's)
            return get_linear_method(replace(spec, serialized=False, format=""))
        return get_linear_method(spec, 8 if spec.keeps_8bit(names) else 4)
    return method_for
