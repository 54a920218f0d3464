"""Mixture-of-Experts feed-forward: a router picks k of E SwiGLU experts per token; their outputs, weighted by
the router, are summed (plus, in some models, a shared expert every token uses).

Routing variants, all options of `route` (MoEConfig says which a model uses):
  - Mixtral / Qwen3-MoE: softmax over the E router logits, the top k, renormalized to sum to one
    (`renormalize`; Qwen2-MoE keeps the raw softmax weights);
  - DeepSeek-V3 style: sigmoid scores; a per-expert correction bias added for *selection only*; experts in
    `num_groups` groups of which the best `topk_groups` (by the sum of their two best scores) are eligible;
    weights renormalized and multiplied by `routed_scaling_factor`.
Experts are stacked: w13 [E, 2I, H] (each expert's gate rows, then its up rows) and w2 [E, H, I], filled from the
checkpoint's per-expert tensors by their weight loaders. On the GPU the router runs as one kernel and the experts as
the fused grouped GEMMs of kernels/moe.py, or for a step of a few tokens its grouped GEMV, which (as the router's GEMV
does) applies the norm before the layer as it loads the input; elsewhere the experts run as a loop over those that
received tokens (the reference).

Quantized experts run with 16-bit activations (a static activation scale, where a checkpoint has one, is unused):
  - FP8 (an FP8 checkpoint's, or `quantization="fp8"` on a 16-bit one): FP8 values with float32 scales as the
    checkpoint lays them out, per tensor (expanded to per row), per output row, or per 128 x 128 block (W8A16);
  - 4-bit (AWQ, GPTQ without act-order, compressed-tensors pack-quantized, NVFP4, MXFP4 checkpoints, or
    `quantization="int4"` on a 16-bit one): each expert's projection is read by the 4-bit linear method
    (layers/quantization/int4.py: every format, and its tensor-parallel slicing) into a staging layer, then its
    packed nibbles, scales and offsets are copied into the stacked tensors (W4A16).
Every tensor of an expert's projection reaches the stacked weight's loader as (expert, part, name).

Over tensor-parallel ranks the experts split one of two ways. By width (the default): each rank holds a slice of
every expert. By expert (`expert_parallel`): each rank holds a contiguous 1/N of the experts, whole, and computes
only the (token, expert) pairs routed to them. Tensor-parallel attention leaves every rank with every token, so
dispatching is local (a rank picks its pairs; no tokens travel) and combining is the same one all-reduce that
sums the width slices: vLLM's expert parallelism without data parallelism does the same. An all-to-all pays once
ranks hold different tokens (data-parallel attention), which slipstream does not have.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from slipstream import kernels
from slipstream.config import MoEConfig
from slipstream.layers.linear import Linear, materialize, narrow, norm_linear, silu_mul_linear
from slipstream.layers.norm import RMSNorm
from slipstream.kernels.moe import Fp8Experts, Int4Experts, routable
from slipstream.layers.quantization import LinearMethod, QuantSpec, get_linear_method
from slipstream.layers.quantization import int4
from slipstream.layers.quantization.fp8 import DUMMY_SCALE, FP8, Fp8, dequantize, quantize_weight_per_channel
from slipstream.layers.quantization.int4 import Int4, online_group, quantize_rtn
from slipstream.parallel.shard import Shard

MethodFor = Callable[[str], LinearMethod]


def route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64). (The reference of the routing
    kernel, kernels.moe_route, which the fused layer runs on the GPU.)"""
    scores = torch.softmax(logits.float(), -1) if cfg.scoring == "softmax" else torch.sigmoid(logits.float())
    choose = scores if bias is None else scores + bias.float()
    if cfg.num_groups > 1:
        t, e = choose.shape
        groups = choose.view(t, cfg.num_groups, e // cfg.num_groups)
        group_score = groups.topk(2, -1).values.sum(-1) if bias is not None else groups.amax(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(cfg.topk_groups, -1).indices, 1.0)
        choose = choose.masked_fill(~keep.bool().repeat_interleave(e // cfg.num_groups, 1), float("-inf"))
    ids = choose.topk(cfg.top_k, -1).indices
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * cfg.routed_scaling_factor, ids


def expert_weights(w13: torch.Tensor, w2: torch.Tensor, e: int, quant: Fp8Experts | Int4Experts | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate-up [2I, H] and down [H, I] weights in `dtype`, dequantized where they are FP8 or 4-bit."""
    if quant is None:
        return w13[e], w2[e]
    if isinstance(quant, Int4Experts):
        return tuple(int4.dequantize(w[e], s[e], None if o is None else o[e], dtype)
                     for w, s, o in ((w13, quant.w13_scales, quant.w13_offsets), (w2, quant.w2_scales, quant.w2_offsets)))
    return dequantize(w13[e], quant.w13_scale[e], quant.block, dtype), dequantize(w2[e], quant.w2_scale[e], quant.block, dtype)


def experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                quant: Fp8Experts | Int4Experts | None = None) -> torch.Tensor:
    """The experts as a loop: each expert runs on the tokens routed to it (the reference of kernels.fused_moe).
    Pairs whose id is negative (another rank's expert) add nothing. `quant`: the weights are FP8 or 4-bit, as
    kernels.fused_moe takes them."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        token, slot = (ids == e).nonzero(as_tuple=True)
        a, b = expert_weights(w13, w2, e, quant, x.dtype)
        gate, up = F.linear(x[token], a).chunk(2, -1)
        y = F.linear(F.silu(gate) * up, b)
        out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
    return out


class SharedExpert(nn.Module):
    """The SwiGLU expert every token goes through (Qwen2-MoE, DeepSeek), named as checkpoints name it; split over
    tensor-parallel ranks like an MLP (its partial sum joins the routed experts' before the one all-reduce)."""

    def __init__(self, hidden: int, inter: int, fused: bool, shard: Shard, method_for: MethodFor | None, prefix: str) -> None:
        """`prefix`: its checkpoint name, by which a quantization's ignore list names it."""
        super().__init__()
        i0, n = shard.part(inter)
        split = shard.world > 1
        method = method_for or (lambda _: None)
        self.gate_up_proj = Linear(hidden, [n, n], method=method(f"{prefix}.gate_up_proj"), fused=fused,
                                   take=(0, (i0, i0)) if split else None)
        self.down_proj = Linear(n, hidden, method=method(f"{prefix}.down_proj"), fused=fused,
                                take=(1, (i0,)) if split else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul_linear(self.gate_up_proj(x), self.down_proj)


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, hidden: int, fused: bool, shard: Shard | None = None,
                 method_for: MethodFor | None = None, prefix: str = "mlp") -> None:
        """`shard`: tensor parallelism splits every expert's width (gate and up rows, down columns) over the ranks,
        or, with `shard.expert_parallel`, gives each rank whole experts; either way each rank routes every token
        the same way (the router is whole on each). `method_for`: the model's quantization by layer prefix (FP8 and
        4-bit make the experts so; others leave them 16-bit)."""
        super().__init__()
        self.cfg, self.fused = cfg, fused
        self.shard = shard = shard or Shard.single()
        self.by_expert = shard.expert_parallel and shard.world > 1
        if self.by_expert:
            if cfg.num_experts < shard.world:
                raise ValueError(f"expert parallelism needs at least one expert a rank: {cfg.num_experts} experts, "
                                 f"{shard.world} ranks")
            (self.e0, e), (self.i0, inter) = shard.part(cfg.num_experts), (0, cfg.intermediate_size)
        else:
            (self.e0, e), (self.i0, inter) = (0, cfg.num_experts), shard.part(cfg.intermediate_size)
        # The router stays in the model's dtype, or float32 (torch's). On one rank it runs the fused GEMV for a few
        # rows; over several, cuBLAS on every rank: each rank's autotuner may pick other tiles, so another summation
        # order, and every rank must route every token the same way.
        self.gate = Linear(hidden, cfg.num_experts, fused=fused and not cfg.router_float32 and shard.world == 1)
        if cfg.router_float32:
            self.gate.float()
        # A step of a few tokens on the GPU can run the norm before the layer inside its kernels: the router's GEMV
        # and the experts' grouped GEMV each apply it as they load the input (one launch fewer a layer). Not where a
        # shared expert or a float32 router also reads the normalized input.
        self.folds_norm = self.gate.fused and not cfg.shared_intermediate_size
        # (quantization ignore lists name checkpoint modules: an expert's stand for all of them)
        method = method_for(f"{prefix}.experts.0.gate_up_proj") if method_for else None
        down = method_for(f"{prefix}.experts.0.down_proj") if method_for else None
        if method_for and type(method) is not type(down):
            raise ValueError(f"the quantization ignores only some of the experts' projections in {prefix}: a MoE "
                             "layer's experts are quantized together")
        self.spec: QuantSpec | None = method.spec if isinstance(method, (Fp8, Int4)) else None
        # 4-bit experts: each projection's integers (8-bit: a GGUF's 5- to 8-bit blocks), and columns per scale
        self._bits = {"w13": getattr(method, "bits", 4), "w2": getattr(down, "bits", 4)}
        self.hidden, self.inter = hidden, inter
        self._groups: dict[str, int] = {}
        experts = [(i, part) for i in range(self.e0, self.e0 + e) for part in (0, 1)], [(i, None) for i in range(self.e0, self.e0 + e)]
        stored = self.spec is not None and self.spec.serialized  # quantized in the checkpoint (else once loaded)
        if stored and self.spec.method == "int4":
            # the staging layers' tensors, as the format names them; the stacked ones are filled from those
            self._staged: dict[tuple[str, int], tuple[Linear, set]] = {}
            with torch.device("meta"):
                probes = self._staging("w13"), self._staging("w2")
            # what each projection's checkpoint holds
            self._expected = {name: [n for n, _ in probe.named_parameters()] for name, probe in zip(("w13", "w2"), probes)}
            for name, probe, shards in zip(("w13", "w2"), probes, experts):
                rows, k = probe.out_features, probe.in_features
                wide = self._bits[name] == 8
                setattr(self, name, self._stacked((e, rows, k) if wide else (e, rows, k // 2),
                                                  torch.int8 if wide else torch.uint8, shards, self._expected[name]))
                getattr(self, name).dummy_value = 5 if wide else 0x5A  # random weights: bytes of 5, nibbles 10 and 5
                self._groups[name] = probe.method.group
                groups = k // probe.method.group
                # offsets where the form has them: integer nibbles (not FP4 codes); bytes of a file with offsets
                offsets = self.spec.wide_offsets if wide else self.spec.format not in ("nvfp4", "mxfp4")
                for part, value in (("scales", 0.01), ("offsets", -0.08))[: 2 if offsets else 1]:
                    p = nn.Parameter(torch.empty(e, rows, groups, dtype=torch.float32), requires_grad=False)
                    p.shards, p.dummy_value = (), value
                    setattr(self, f"{name}_{part}", p)
        else:
            if self.spec is not None and self.spec.method == "int4":  # 16-bit weights rounded once loaded: groups now
                self._groups = {"w13": online_group(hidden, self.spec.group), "w2": online_group(inter, self.spec.group)}
            fp8 = stored and self.spec.method == "fp8"
            suffixes = ["weight", self.spec.scale_name] if fp8 else ["weight"]
            self.w13 = self._stacked((e, 2 * inter, hidden), FP8 if fp8 else None, experts[0], suffixes)
            self.w2 = self._stacked((e, hidden, inter), FP8 if fp8 else None, experts[1], suffixes)
            if fp8:
                self.w13.dummy_scale = self.w2.dummy_scale = 1 / DUMMY_SCALE  # random FP8 values over their range
                self.w13_scale = self._scales(e, 2 * inter, hidden, stacked=True)
                self.w2_scale = self._scales(e, hidden, inter, stacked=False)
        if cfg.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32), requires_grad=False)
            self.e_score_correction_bias.dummy_value = 0.0
        if cfg.shared_intermediate_size:
            self.shared_expert = SharedExpert(hidden, cfg.shared_intermediate_size, fused, shard, method_for,
                                              f"{prefix}.{cfg.shared_name}")
            self.shared_expert_gate = Linear(hidden, 1) if cfg.shared_gate else None

    def _stacked(self, shape: tuple[int, ...], dtype: torch.dtype | None, experts: list, suffixes: list[str]) -> nn.Parameter:
        """A stacked expert weight; its loader takes each (expert, part) tensor named by each of `suffixes`."""
        p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        p.weight_loader, p.units = self._load_expert, (1, 1)
        p.shards = tuple((i, part, suffix) for i, part in experts for suffix in suffixes)
        return p

    def _scales(self, e: int, rows: int, cols: int, stacked: bool) -> nn.Parameter:
        """FP8 experts' scales as the checkpoint lays them out: [E, parts] per tensor, [E, rows, 1] per row, or
        [E, rows / bn, cols / bk] per block; `units` says how many weight rows and columns one entry covers. (Filled
        through the stacked weight's loader.)"""
        kind = self.spec.weight_scales
        if kind == "tensor":
            shape, units = (e, 2 if stacked else 1), (0, 0)
        elif kind == "channel":
            shape, units = (e, rows, 1), (1, 0)
        else:
            bn, bk = self.spec.block
            part = rows // 2 if stacked else cols  # what one rank's split cuts: gate / up rows, down columns
            if part % (bn if stacked else bk) or (self.i0 % (bn if stacked else bk)):
                raise ValueError(f"block-scaled FP8 experts need each rank's expert width ({part} from {self.i0}) to "
                                 f"be a multiple of the {self.spec.block} blocks")
            shape, units = (e, -(-rows // bn), -(-cols // bk)), (bn, bk)
        p = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        p.shards, p.units, p.dummy_value = (), units, DUMMY_SCALE
        return p

    def _staging(self, name: str) -> Linear:
        """A 4-bit (or 8-bit) linear layer for one expert's gate and up (w13) or down (w2) projection, this rank's
        share."""
        split, method = self.shard.world > 1 and not self.by_expert, get_linear_method(self.spec, self._bits[name])
        if name == "w13":
            return Linear(self.hidden, [self.inter] * 2, method=method, fused=True,
                          take=(0, (self.i0, self.i0)) if split else None)
        return Linear(self.inter, self.hidden, method=method, fused=True, take=(1, (self.i0,)) if split else None)

    def _load_expert(self, param: nn.Parameter, tensor: Any, shard: tuple[int, int | None, str]) -> None:
        expert, part, suffix = shard
        name = "w13" if param is self.w13 else "w2"
        e = expert - self.e0
        if not 0 <= e < param.shape[0]:
            return  # another rank's expert: not read at all
        if self.spec is not None and self.spec.serialized and self.spec.method == "int4":
            return self._stage(name, e, part, suffix, tensor)
        if suffix == "weight":
            return self._copy(param, e, part, tensor)
        if self.spec is not None and self.spec.method == "fp8" and suffix == self.spec.scale_name:
            return self._copy(getattr(self, f"{name}_scale"), e, part, tensor)
        if suffix != "input_scale":  # (an FP8 checkpoint's static activation scale: unused)
            raise ValueError(f"experts have no tensor named {suffix!r} in this model")

    def _copy(self, param: nn.Parameter, e: int, part: int | None, tensor: Any) -> None:
        """One expert's tensor into its rows of a stacked parameter (this rank's slice of it, by `param.units`)."""
        dst = param.data[e]
        rows_per, cols_per = param.units
        width_split = self.shard.world > 1 and not self.by_expert
        if param.dim() == 2:  # one scale per expert and stacked part (per-tensor FP8): the tensor's, whole
            dst, tensor = dst.narrow(0, part or 0, 1), materialize(tensor).reshape(1)
        elif part is not None:  # gate (0) or up (1) rows of the stacked [gate | up]; this rank's rows of either
            dst = dst.narrow(0, part * (dst.shape[0] // 2), dst.shape[0] // 2)
            tensor = narrow(tensor, 0, self.i0 // rows_per, dst.shape[0]) if width_split else tensor
        elif width_split and cols_per:  # down: this rank's columns
            tensor = narrow(tensor, 1, self.i0 // cols_per, dst.shape[1])
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(materialize(tensor))

    def _stage(self, name: str, e: int, part: int | None, suffix: str, tensor: Any) -> None:
        """A 4-bit checkpoint tensor into the expert's staging layer; once it holds all of them, its packed form
        into the stacked tensors."""
        linear, got = self._staged.get((name, e)) or (None, set())
        if linear is None:
            with torch.device(self.w13.device):
                linear = self._staging(name)
        target = getattr(linear, suffix, None)
        if not isinstance(target, nn.Parameter):
            if suffix == "input_scale":
                return
            raise ValueError(f"4-bit experts ({self.spec.format}) have no tensor named {suffix!r}")
        target.weight_loader(target, tensor, part)
        got.add((suffix, part))
        if len(got) < len(self._expected[name]) * (2 if name == "w13" else 1):
            self._staged[(name, e)] = (linear, got)
            return
        self._staged.pop((name, e), None)
        linear.method.process_after_loading(linear)
        if hasattr(linear, "perm"):
            raise ValueError("GPTQ checkpoints with act-order (g_idx out of column order) are not supported for MoE "
                             "experts: each expert would gather the input in its own order")
        getattr(self, name).data[e].copy_(linear.qweight)
        getattr(self, f"{name}_scales").data[e].copy_(linear.scales)
        if hasattr(self, f"{name}_offsets"):  # (zeros where an expert's kind has none: the staging layer dropped them)
            offsets = getattr(self, f"{name}_offsets").data[e]
            offsets.copy_(linear.offsets) if linear.offsets is not None else offsets.zero_()

    def after_loading(self) -> None:
        """Quantized experts in the form the kernels read: FP8 scales [E, rows] per row (or per block); 16-bit weights
        of a 16-bit checkpoint quantized once loaded, one expert at a time (FP8 per row; 4-bit per group of 128 columns,
        or fewer where the width is not a multiple)."""
        if self.spec is None:
            return
        if self.spec.serialized and self.spec.method == "int4":  # (filled as each projection's tensors came in)
            for name in ("w13", "w2"):  # bytes whose kinds have no offsets, in a file with some: zeros, dropped
                if self._bits[name] == 8 and hasattr(self, f"{name}_offsets") and not bool(getattr(self, f"{name}_offsets").any()):
                    delattr(self, f"{name}_offsets")
            return
        for name in ("w13", "w2"):
            w = getattr(self, name)
            if self.spec.serialized:
                s = getattr(self, f"{name}_scale").data
                if self.spec.weight_scales == "tensor":  # per stacked part -> per row
                    s = s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
                elif self.spec.weight_scales == "channel":
                    s = s[..., 0]
                setattr(self, f"{name}_scale", nn.Parameter(s.contiguous(), requires_grad=False))
            elif self.spec.method == "fp8":
                q = torch.empty(w.shape, dtype=FP8, device=w.device)
                s = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
                for e in range(w.shape[0]):
                    q[e], s[e] = quantize_weight_per_channel(w.data[e])
                setattr(self, name, nn.Parameter(q, requires_grad=False))
                setattr(self, f"{name}_scale", nn.Parameter(s, requires_grad=False))
            else:
                e, n, k = w.shape
                groups = k // self._groups[name]
                q = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
                s = torch.empty(e, n, groups, dtype=torch.float16, device=w.device)
                o = torch.empty_like(s)
                for i in range(e):
                    q[i], s[i], o[i] = quantize_rtn(w.data[i], self._groups[name])
                for part, t in (("", q), ("_scales", s), ("_offsets", o)):
                    setattr(self, name + part, nn.Parameter(t, requires_grad=False))

    @property
    def quant(self) -> Fp8Experts | Int4Experts | None:
        """How the kernels read the stacked experts."""
        if self.spec is None:
            return None
        if self.spec.method == "fp8":
            return Fp8Experts(self.w13_scale, self.w2_scale, self.spec.block if self.spec.weight_scales == "block" else None)
        offsets = getattr(self, "w13_offsets", None), getattr(self, "w2_offsets", None)
        return Int4Experts(self.w13_scales, offsets[0], self._groups["w13"], self.w2_scales, offsets[1], self._groups["w2"])

    def forward(self, h: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(MoE(norm(h + residual)), h + residual)."""
        if self.folds_norm and self.gate.runs_gemv(h):
            quant = self.quant
            tiles = kernels.moe_tiles(h, self.w13, self.w2, self.cfg.top_k, quant)
            if tiles.get("GEMV"):
                logits, residual = norm_linear(h, residual, norm, self.gate)
                weights, ids = self._select(logits)
                y = kernels.fused_moe(residual, self.w13, self.w2, weights, ids, quant=quant, tiles=tiles,
                                      norm=(norm.weight, norm.eps))
                return self.shard.all_reduce(y), residual
        x, residual = norm(h, residual)
        return self.routed(x), residual

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        weights, ids = self._select(self.gate(x.float() if cfg.router_float32 else x))
        quant = self.quant
        if self.fused:
            y = kernels.fused_moe(x, self.w13, self.w2, weights, ids, skipped_pairs=self.by_expert, quant=quant)
        else:
            y = experts_ref(x, self.w13, self.w2, weights, ids, quant)
        if cfg.shared_intermediate_size:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            y = y + shared
        return self.shard.all_reduce(y)  # the ranks' slices of every expert, or their experts (and the shared one), summed

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's logits -> (weights, ids) of each token's experts; with expert parallelism, ids by this rank's
        own expert index, -1 for another rank's."""
        bias, cfg = getattr(self, "e_score_correction_bias", None), self.cfg
        if self.fused and routable(cfg.num_experts, cfg.num_groups):  # one kernel, not ten torch ops
            weights, ids = kernels.moe_route(logits, cfg.top_k, sigmoid=cfg.scoring == "sigmoid", bias=bias,
                                             num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
                                             renormalize=cfg.renormalize, scale=cfg.routed_scaling_factor)
        else:
            weights, ids = route(logits, cfg, bias)
        if self.by_expert:  # this rank's pairs, by its own expert index; the others' are skipped (-1)
            local = ids - self.e0
            ids = torch.where((local >= 0) & (local < self.w13.shape[0]), local, -1)
        return weights, ids
