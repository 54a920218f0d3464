"""Linear layers, and the projections fused with the elementwise op before them (RMSNorm before QKV and gate-up,
SwiGLU before down).

A `Linear` may stack several outputs along its rows (q | k | v, gate | up: one GEMM instead of three and two);
its parameters load per shard, each through its own `weight_loader`, so a checkpoint's separate tensors land in
the stacked weight and a new weight format only brings a new quantization method. For one row (batch-1
decode) or a few (a verifying step, a small batch: up to kernels.LAYER_GEMV_ROWS) on the GPU, a projection and the op
before it run as one GEMV kernel (the method's `gemv`) that streams the weight once; otherwise the op runs, then
the method's matmul.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slipstream import kernels
from slipstream.layers.activation import silu_and_mul
from slipstream.layers.norm import RMSNorm
from slipstream.layers.quantization import LinearMethod, get_linear_method


def materialize(tensor: Any) -> torch.Tensor:
    """A checkpoint tensor, read whole if it came lazily (a tensor-parallel rank's loader reads only its slices)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.materialize()


def narrow(tensor: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Part of a checkpoint tensor; of a lazy one, only that part is read."""
    return tensor.narrow(dim, start, size)


def default_weight_loader(param: nn.Parameter, tensor: Any, shard: int | None = None) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(materialize(tensor))


class Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False,
                 method: LinearMethod | None = None, fused: bool = False,
                 take: tuple[int, tuple[int, ...]] | None = None) -> None:
        """`take`: this layer is one rank's slice of a tensor-parallel layer, (axis, starts): along the checkpoint
        tensors' rows (0: column-parallel; a start per output shard, each `output_sizes[i]` rows long) or columns
        (1: row-parallel; one start, `in_features` columns)."""
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features, self.out_features = in_features, sum(self.output_sizes)
        self.fused = fused
        self.method = method or get_linear_method("none")
        self.take = take
        if take is not None and bias and take[0] == 1:
            raise ValueError("a row-parallel layer cannot hold a bias (each rank would add it to its partial sum)")
        self.method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False)
            self.set_loader(self.bias, stacked=True)
        else:
            self.register_parameter("bias", None)

    def _slice(self, tensor: Any, shard: int | None, rows_per: int = 1, cols_per: int = 1, out_dim: int = 0) -> Any:
        """This rank's part of a checkpoint tensor (the whole tensor when the layer is not split). Its axis
        `out_dim` runs along the outputs, one entry for `rows_per` output rows; the other along the inputs, one entry
        for `cols_per` input columns (0: it has no input axis, as per-channel scales)."""
        if self.take is None:
            return tensor
        split, starts = self.take
        if split == 0:
            return narrow(tensor, out_dim, *_units(starts[shard or 0], self.output_sizes[shard or 0], rows_per, "rows"))
        in_dim = 1 - out_dim if len(tensor.shape) > 1 else 0
        if cols_per == 0 or (len(tensor.shape) < 2 and out_dim == 0):
            return tensor
        return narrow(tensor, in_dim, *_units(starts[0], self.in_features, cols_per, "columns"))

    def set_loader(self, param: nn.Parameter, stacked: bool, rows_per: int = 1, per_shard: bool = False, dim: int = 0,
                   same: bool = False, cols_per: int = 1) -> None:
        """Give `param` its weight loader: by output shard when its rows follow `output_sizes` (one row per
        `rows_per` output rows: block scales, packed columns; the output axis is `dim`), one entry per shard
        (`per_shard`: per-tensor scales), every shard the same tensor (`same`: GPTQ's g_idx), else whole.
        `cols_per`: input columns per column of it, for a row-parallel split (0: no input axis)."""
        if per_shard:
            param.weight_loader = self._load_entry
            param.shards = tuple(range(len(self.output_sizes))) if len(self.output_sizes) > 1 else (None,)
        elif same and (len(self.output_sizes) > 1 or self.take is not None):
            param.weight_loader = self._load_same
            param.shards = tuple(range(len(self.output_sizes))) if len(self.output_sizes) > 1 else (None,)
        elif stacked and len(self.output_sizes) > 1:
            param.weight_loader = lambda p, t, shard: self._load_rows(p, t, shard, rows_per, dim, cols_per)
            param.shards = tuple(range(len(self.output_sizes)))
        elif self.take is not None:
            param.weight_loader = lambda p, t, shard: default_weight_loader(p, self._slice(t, None, rows_per, cols_per, dim))
        else:
            param.weight_loader = default_weight_loader

    def _load_rows(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None, rows_per: int, dim: int = 0,
                   cols_per: int = 1) -> None:
        if shard is None:
            raise ValueError(f"a stacked parameter of {len(self.output_sizes)} shards was given a whole tensor")
        start = sum(self.output_sizes[:shard]) // rows_per
        dst = param.data.narrow(dim, start, self.output_sizes[shard] // rows_per)
        tensor = self._slice(tensor, shard, rows_per, cols_per, dim)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(materialize(tensor))

    def _load_same(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        seen = param.__dict__.setdefault("loaded_shards", set())
        if self.take is not None and self.take[0] == 1:  # along the inputs (g_idx): a row-parallel rank's columns
            tensor = narrow(tensor, 0, self.take[1][0], self.in_features)
        tensor = materialize(tensor)
        if seen and not torch.equal(param.data, tensor.to(param.device, param.dtype)):
            raise ValueError("the projections fused into this layer hold different tensors where they must agree")
        default_weight_loader(param, tensor)
        seen.add(shard)

    @staticmethod
    def _load_entry(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        tensor = materialize(tensor)  # a per-tensor scale: whole on every rank
        if tensor.numel() != 1:
            raise ValueError(f"expected one scale per tensor, got shape {tuple(tensor.shape)}")
        param.data[shard or 0] = tensor.reshape(())

    def runs_gemv(self, x: torch.Tensor) -> bool:
        """Does this input run as the fused GEMV (few enough rows; fused with the op before the projection where
        there is one)?"""
        return self.fused and self.method.supports_gemv and 1 <= x.shape[0] <= kernels.LAYER_GEMV_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


def _units(start: int, size: int, per: int, what: str) -> tuple[int, int]:
    """A rank's [start, start + size) in units of `per` (a scale block): it must begin on a block's edge."""
    if start % per:
        raise ValueError(f"a tensor-parallel rank's {what} start at {start}, inside a {per}-wide scale block of the "
                         "checkpoint: choose a tensor_parallel_size that splits on block edges")
    return start // per, -(-size // per)


def load_checkpoint_tensor(params: dict[str, nn.Parameter], name: str, tensor: Any, packed: dict[str, tuple[str, int]],
                           owner: str) -> tuple[str, int | None]:
    """Give one checkpoint tensor (HF name) to its parameter's weight loader; `packed` maps a checkpoint module fused
    into a stacked parameter to that parameter and its shard (q_proj -> (qkv_proj, 0)). Returns (parameter, shard)."""
    parts = name.split(".")
    target, shard = name, None
    for i, part in enumerate(parts):
        if part in packed:
            parts[i], shard = packed[part]
            target = ".".join(parts)
            break
    if target not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in {owner}")
    param = params[target]
    try:
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return target, shard


def check_all_loaded(params: dict[str, nn.Parameter], loaded: set[tuple[str, int | None]]) -> None:
    """Every parameter (every shard of a stacked one) got a checkpoint tensor."""
    expected = {(n, s) for n, p in params.items() for s in getattr(p, "shards", (None,))}
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing, key=str)[:3]}")


def finish_loading(model: nn.Module) -> None:
    """Let every linear layer's method convert what was loaded (after real or random weights), and every other
    module that holds weights of its own form (a MoE layer's stacked experts: `after_loading`)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_after_loading(module)
        elif hasattr(module, "after_loading"):
            module.after_loading()


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, proj: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual); with no residual, (proj(norm(x)), x)."""
    if proj.runs_gemv(x):
        return proj.method.gemv(proj, x, prologue="rmsnorm", residual=residual, norm_weight=norm.weight, eps=norm.eps)
    h, residual = norm(x, residual)
    return proj(h), residual


def silu_mul_linear(gate_up: torch.Tensor, proj: Linear) -> torch.Tensor:
    """proj(silu(gate) * up) for a fused [gate | up] input."""
    if proj.runs_gemv(gate_up):
        return proj.method.gemv(proj, gate_up, prologue="silu_mul")[0]
    return proj(silu_and_mul(gate_up, proj.fused))
