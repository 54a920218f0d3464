"""Weights kept in the model's dtype: cuBLAS for many rows, the fused GEMV for a few (kernels.LAYER_GEMV_ROWS) on the GPU."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slipstream import kernels

if TYPE_CHECKING:
    from slipstream.layers.linear import Linear


class Unquantized:
    supports_gemv = True

    def create_weights(self, layer: "Linear") -> None:
        weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.register_parameter("weight", weight)
        layer.set_loader(weight, stacked=True)

    def process_after_loading(self, layer: "Linear") -> None:
        pass

    def gemv(self, layer: "Linear", x: torch.Tensor, **prologue: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return kernels.gemv(x, layer.weight, layer.bias, **prologue)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if layer.runs_gemv(x):
            return kernels.gemv(x, layer.weight, layer.bias)[0]
        return F.linear(x, layer.weight, layer.bias)
