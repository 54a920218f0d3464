"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, TinyLlama; Qwen2 adds q/k/v bias, Qwen3 adds q/k RMSNorm).

Pre-norm transformer: x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)); logits = RMSNorm(x) @ W_out.
Q, K and V are one fused projection, as are the MLP's gate and up projections: one GEMM each instead of three
and two. `load_weights` maps checkpoint names (HF layout) onto those fused parameters. Each norm is applied by
the projection that consumes it (`norm_linear`), and SwiGLU by the down projection (`silu_mul_linear`), so that
small-batch decode runs each pair as one kernel.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from slipstream import kernels
from slipstream.attention import AttentionBackend, AttentionMetadata
from slipstream.attention.torch_backend import store_kv
from slipstream.config import ModelConfig
from slipstream.layers.linear import linear, norm_linear, silu_mul_linear
from slipstream.layers.norm import RMSNorm
from slipstream.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.backend = backend
        self.scale = cfg.head_dim**-0.5
        # Bound by the model runner once the KV pool is allocated: [num_blocks, block_size, Hk, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the pool for already-projected qkv [T, (Hq + 2 Hk) D], through o_proj."""
        if kernels.enabled(qkv):  # one fused kernel: q/k norm, RoPE, K/V into the pool
            q = kernels.qk_norm_rope_store(
                qkv, positions, self.rotary.cos_sin, meta.slot_mapping, self.k_cache, self.v_cache, self.num_heads,
                self.num_kv_heads, self.head_dim, *((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()),
            )
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q)[0], self.k_norm(k)[0]
            q, k = self.rotary(positions, q, k)
            store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
        return linear(o.view(-1, self.q_size), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU on the already-projected [gate | up], through down_proj."""
        return silu_mul_linear(gate_up, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
        h = self.self_attn(positions, qkv, meta)
        gate_up, residual = norm_linear(h, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_dict)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Flat batch of T tokens from many sequences -> final hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head)

    # Checkpoint (HF layout) name fragment -> (fused parameter fragment, shard index)
    _STACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names, `model.` prefix optional) into the fused parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = name, None
            for frag, (fused, idx) in self._STACKED.items():
                if f".{frag}." in name:
                    target, shard = name.replace(frag, fused), idx
                    break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if shard is None:
                dst = param.data
            else:
                sizes = self._shard_sizes(target)
                dst = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        expected = {f"{n}#{s}" for n in params for s in self._shards_of(n)}
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight#None")
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

    def _shard_sizes(self, fused_name: str) -> list[int]:
        c = self.config
        if "qkv_proj" in fused_name:
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def _shards_of(self, name: str) -> list[int | None]:
        return list(range(len(self._shard_sizes(name)))) if ("qkv_proj" in name or "gate_up_proj" in name) else [None]
