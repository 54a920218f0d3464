"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, TinyLlama; Qwen2 adds q/k/v bias, Qwen3 adds q/k RMSNorm;
Mixtral, Qwen2-MoE and Qwen3-MoE replace the SwiGLU of some or all layers by a Mixture of Experts; GLM-4.5 adds
partial RoPE to that, with DeepSeek-V3's routing, and its MTP module, models/mtp.py).

Pre-norm transformer: x = x + Attn(RMSNorm(x)); x = x + FFN(RMSNorm(x)); logits = RMSNorm(x) @ W_out, where FFN is
a SwiGLU MLP or, in the layers ModelConfig.moe names, a routed mixture of SwiGLU experts (layers/moe.py).
Q, K and V are one fused projection, as are the MLP's gate and up projections: one GEMM each instead of three
and two. `load_weights` maps checkpoint names (HF layout) onto those fused parameters. Each norm is applied by
the projection that consumes it (`norm_linear`), and SwiGLU by the down projection (`silu_mul_linear`), so that
small-batch decode runs each pair as one kernel.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slipstream import kernels
from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.config import ModelConfig
from slipstream.layers.linear import (Linear, check_all_loaded, default_weight_loader, finish_loading,
                                     load_checkpoint_tensor, narrow, norm_linear, silu_mul_linear)
from slipstream.layers.moe import MoE
from slipstream.layers.norm import RMSNorm
from slipstream.layers.quantization import LinearMethod, get_linear_method
from slipstream.layers.rotary import RotaryEmbedding
from slipstream.parallel.shard import Shard

# Which quantization method the linear layer at a given parameter prefix uses ("model.layers.0.mlp.down_proj").
MethodFor = Callable[[str], LinearMethod]


def unquantized(prefix: str) -> LinearMethod:
    return get_linear_method("none")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, backend: AttentionBackend,
                 method_for: MethodFor, fused: bool, shard: Shard, in_features: int | None = None,
                 kv_index: int | None = None) -> None:
        """`in_features`: what the q/k/v projection reads (default the hidden size; an EAGLE-3 head reads twice it).
        `kv_index`: which of the backend's layers keeps its KV (default `layer`; a draft head's own pool has one)."""
        super().__init__()
        d = cfg.head_dim
        q0, self.num_heads, kv0, self.num_kv_heads = shard.heads(cfg.num_heads, cfg.num_kv_heads)  # this rank's
        self.head_dim, self.shard = d, shard
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        prefix = f"layers.{layer}.self_attn"
        split = shard.world > 1
        self.qkv_proj = Linear(in_features or cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias,
                               method=method_for(f"{prefix}.qkv_proj"), fused=fused,
                               take=(0, (q0 * d, kv0 * d, kv0 * d)) if split else None)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, method=method_for(f"{prefix}.o_proj"), fused=fused,
                             take=(1, (q0 * d,)) if split else None)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.backend = backend  # owns this layer's KV pages (index `layer`)
        self.layer = layer if kv_index is None else kv_index
        self.fused = fused
        self.scale = cfg.head_dim**-0.5

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the pool for already-projected qkv [T, (Hq + 2 Hk) D], through o_proj."""
        if self.fused:  # one kernel: q/k norm, RoPE, K/V into the backend's pages
            k_cache, v_cache = self.backend.kv_cache(self.layer)
            q = kernels.qk_norm_rope_store(
                qkv, positions, self.rotary.cos_sin, meta.slot_mapping, k_cache, v_cache, self.num_heads,
                self.num_kv_heads, self.head_dim, *((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()),
                kv_scales=self.backend.kv_scales(self.layer),
            )
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q)[0], self.k_norm(k)[0]
            q, k = self.rotary(positions, q, k)
            self.backend.store_kv(self.layer, k, v, meta)
        o = self.backend.attend(self.layer, q, meta, self.scale)
        return self.shard.all_reduce(self.o_proj(o.view(-1, self.q_size)))  # the ranks' heads summed


class VocabEmbedding(nn.Module):
    """Token embeddings, split by vocabulary rows over tensor-parallel ranks: a rank looks up the ids it holds, zero
    for the others, and the ranks' lookups are summed."""

    def __init__(self, vocab: int, hidden: int, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.start, rows = shard.part(vocab)
        self.weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        if shard.world > 1:
            self.weight.weight_loader = lambda p, t, _: default_weight_loader(p, narrow(t, 0, self.start, rows))

    def tie(self, head: Linear) -> None:
        """One table for the tokens in and the logits out (tied embeddings). A head kept in 8-bit blocks (a GGUF
        file's token_embd) owns the table (its int8 rows and group scales, or once loaded on a CPU their dequantized
        weight): lookups read the head's as it is then. A head rounded at load (quantize_lm_head) reads the table as
        it loads, then holds its own rounded copy: lookups keep the 16-bit table."""
        if hasattr(head, "qweight"):
            self.dtype = self.weight.dtype
            del self.weight
            self._head = (head,)  # (in a tuple: not a submodule, its parameters are the head's)
        else:
            head.weight = self.weight

    def _table(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, None, None), or the 8-bit head's (int8 rows, group scales, group offsets or None)."""
        if not hasattr(self, "_head"):
            return self.weight, None, None
        head = self._head[0]
        return (head.weight, None, None) if hasattr(head, "weight") else (head.qweight, head.scales, head.offsets)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows this rank holds, hidden size)."""
        return tuple(self._table()[0].shape)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        table, scales, offsets = self._table()
        if scales is None:
            return F.embedding(ids, table)
        q, s = table[ids].float(), scales[ids].float()
        w = q.view(*s.shape, -1) * s[..., None]
        if offsets is not None:
            w = w + offsets[ids].float()[..., None]
        return w.view(q.shape).to(self.dtype)

    def table(self) -> torch.Tensor:
        """Every row this rank holds, dequantized."""
        return self._rows(torch.arange(self.shape[0], device=self._table()[0].device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.world == 1:
            return self._rows(ids)
        local = ids - self.start
        rows = self.shape[0]
        mine = (local >= 0) & (local < rows)
        x = self._rows(local.clamp(0, rows - 1))
        return self.shard.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, method_for: MethodFor, fused: bool, shard: Shard) -> None:
        super().__init__()
        prefix = f"layers.{layer}.mlp"
        i0, inter = shard.part(cfg.intermediate_size)  # this rank's columns of the MLP's width
        split = shard.world > 1
        self.shard = shard
        self.gate_up_proj = Linear(cfg.hidden_size, [inter] * 2, method=method_for(f"{prefix}.gate_up_proj"),
                                   fused=fused, take=(0, (i0, i0)) if split else None)
        self.down_proj = Linear(inter, cfg.hidden_size, method=method_for(f"{prefix}.down_proj"), fused=fused,
                                take=(1, (i0,)) if split else None)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(SwiGLU(norm(h + residual)), h + residual): the norm rides on gate_up, SwiGLU on down_proj."""
        gate_up, residual = norm_linear(h, residual, norm, self.gate_up_proj)
        return self.shard.all_reduce(silu_mul_linear(gate_up, self.down_proj)), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, backend: AttentionBackend,
                 method_for: MethodFor, fused: bool, shard: Shard, kv_index: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.self_attn = Attention(cfg, layer, rotary, backend, method_for, fused, shard, kv_index=kv_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        if cfg.moe is not None and layer in cfg.moe.layers:
            self.mlp: nn.Module = MoE(cfg.moe, cfg.hidden_size, fused, shard, method_for, f"layers.{layer}.mlp")
        else:
            self.mlp = MLP(cfg, layer, method_for, fused, shard)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
        h = self.self_attn(positions, qkv, meta)
        return self.mlp(h, residual, self.post_attention_layernorm)


# One expert's tensor in a checkpoint (Qwen-MoE names; Mixtral's w1 / w3 / w2 are gate / up / down): its weight, or
# a quantized weight's part (scales, packed values, ...)
_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.(\w+)")
_EXPERT_PARTS = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
                 "down_proj": ("w2", None), "w2": ("w2", None)}
# Checkpoint (HF layout) projection -> (stacked parameter, shard index)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def unused_tensor(name: str) -> bool:
    """Checkpoint tensors no layer reads: rotary tables, and per-tensor FP8 KV scales (our FP8 cache scales each row
    as it is written)."""
    return "rotary_emb" in name or name.endswith((".k_scale", ".v_scale"))


def load_decoder_tensor(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor, owner: str) -> tuple[str, object]:
    """One checkpoint tensor of decoder layers (HF names without `model.`) to its parameter: projections fused
    into stacked ones, experts' tensors to the stacked [E, ...] weights' loaders. Returns the (parameter, shard)
    it filled."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    # GLM-4.5 (DeepSeek-V3's names): the selection bias sits in the router, the shared experts are plural
    name = name.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias").replace(
        ".mlp.shared_experts.", ".mlp.shared_expert.")
    expert = _EXPERT.fullmatch(name)
    if expert is None:
        return load_checkpoint_tensor(params, name, tensor, PACKED_MODULES, owner)
    stacked, part = _EXPERT_PARTS[expert[3]]
    target, shard = f"{expert[1]}.{stacked}", (int(expert[2]), part, expert[4])
    if target not in params:
        raise ValueError(f"checkpoint tensor {name!r} has no place in {owner}")
    try:
        params[target].weight_loader(params[target], tensor, shard)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{name}: {e}") from None
    return target, shard


class LlamaForCausalLM(nn.Module):
    """`fused`: the model runs on a CUDA device with the Triton kernels (the runner decides, once, at build)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, method_for: MethodFor = unquantized,
                 fused: bool = False, shard: Shard | None = None) -> None:
        """`shard`: this rank's share of a tensor-parallel model (parallel/shard.py); default, the whole model."""
        super().__init__()
        self.config = cfg
        self.shard = shard = shard or Shard.single()
        rotary = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_dict)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, backend, method_for, fused, shard) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        # Split by vocabulary rows, the rows the embedding holds (a tied head is the same tensor; rounded at load,
        # quantize_lm_head, it keeps a quantized copy). Its method: layers/quantization's method_table.
        v0, v = shard.part(cfg.vocab_size)
        self.lm_head = Linear(cfg.hidden_size, v, method=method_for("lm_head"), fused=fused,
                              take=(0, (v0,)) if shard.world > 1 else None)
        if cfg.tie_word_embeddings:
            self.embed_tokens.tie(self.lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                aux_layers: tuple[int, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Flat batch of T tokens from many sequences -> final hidden states [T, hidden]; with `aux_layers`, also the
        states entering those layers side by side, in layer order [T, len(aux_layers) * hidden] (what an EAGLE-3
        head reads)."""
        x, residual = self.embed_tokens(input_ids), None
        aux = []
        for i, layer in enumerate(self.layers):
            if i in aux_layers:  # the residual stream entering layer i
                aux.append(x if residual is None else x + residual)
            x, residual = layer(positions, x, residual, meta)
        hidden = self.norm(x, residual)[0]
        return (hidden, torch.cat(aux, dim=-1)) if aux else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, vocab] on every rank (each computes its rows of the head; the parts are gathered)."""
        return self.shard.all_gather(self.lm_head(hidden), self.config.vocab_size)

    # Checkpoint modules that a quantized checkpoint stores in low precision (the rest stay 16-bit)
    quantizable = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @classmethod
    def checkpoint_modules(cls, prefix: str) -> list[str]:
        """The checkpoint's modules fused into the layer at `prefix` (qkv_proj -> q_proj, k_proj, v_proj)."""
        head, _, last = prefix.rpartition(".")
        parts = sorted((idx, frag) for frag, (stacked, idx) in PACKED_MODULES.items() if stacked == last)
        return [f"{head}.{frag}" for _, frag in parts] or [prefix]

    layer_index = re.compile(r"layers\.(\d+)\.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand each checkpoint tensor (HF names, `model.` prefix optional) to its parameter's weight loader."""
        params = dict(self.named_parameters())  # a tied lm_head shares the embedding's entry
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            layer = self.layer_index.match(name)
            if layer and int(layer[1]) >= self.config.num_layers:  # an MTP module's: models/mtp.py reads them
                continue
            if unused_tensor(name) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            loaded.add(load_decoder_tensor(params, name, tensor, type(self).__name__))
        check_all_loaded(params, loaded)
        del params  # (quantizing once loaded frees each 16-bit weight as it goes)
        finish_loading(self)
