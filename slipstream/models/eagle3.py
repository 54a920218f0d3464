"""EAGLE-3 draft head (Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test", arXiv 2503.01840).

The head predicts the target's next token from more than the token: at position p it reads the embedding of token
p + 1 and a hidden state g_p, and its one decoder layer attends over the g's of the positions before (its own KV
cache, on the target's pages):

    g_p  = fc([h_low; h_mid; h_high]_p)          the target's states entering three of its layers, fused
    x    = [RMSNorm(embed(t_{p+1})); RMSNorm(g_p)]   (2 x hidden: what q, k and v read)
    a    = g_p + Attn(x)                          (the residual is g_p itself)
    o    = a + MLP(RMSNorm(a))
    next = argmax lm_head(RMSNorm(o))             over the draft vocabulary, mapped to target ids (d2t)

Drafting k tokens chains the head on itself: the state o it computed at p is the g of position p + 1 (no fc: it is
already hidden-sized), read beside the embedding of the token it just proposed.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.config import Eagle3Config
from slipstream.layers.linear import Linear, check_all_loaded, finish_loading, load_checkpoint_tensor
from slipstream.layers.norm import RMSNorm
from slipstream.layers.rotary import RotaryEmbedding
from slipstream.models.llama import MLP, Attention, VocabEmbedding, unquantized
from slipstream.parallel.shard import Shard


class Eagle3Head(nn.Module):
    def __init__(self, cfg: Eagle3Config, backend: AttentionBackend, fused: bool = False, own_embedding: bool = True) -> None:
        """`own_embedding`: False for a head that uses the target's token embedding (most published heads carry none):
        it has none until `attach` hands it the target's."""
        super().__init__()
        self.config = cfg
        c, shard = cfg.layer, Shard.single()
        h = c.hidden_size
        rotary = RotaryEmbedding(c.rotary_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling_dict)
        self.fc = Linear(3 * cfg.target_hidden_size, h, fused=fused)
        self.embed_tokens = VocabEmbedding(c.vocab_size, h, shard) if own_embedding else None
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps, fused)
        self.hidden_norm = RMSNorm(h, c.rms_norm_eps, fused)
        self.self_attn = Attention(c, 0, rotary, backend, unquantized, fused, shard, in_features=2 * h)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps, fused)
        self.mlp = MLP(c, 0, unquantized, fused, shard)
        self.norm = RMSNorm(h, c.rms_norm_eps, fused)
        self.lm_head = Linear(h, cfg.draft_vocab_size, fused=fused)
        # the target id of each draft id (published heads store the offsets, `d2t`; the first ids until loaded)
        self.register_buffer("draft_to_target", torch.arange(cfg.draft_vocab_size), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                g: torch.Tensor) -> torch.Tensor:
        """input_ids[i]: the token after position positions[i]; g: the target's three states there [T, 3 x target
        hidden], or the head's own output at the position before [T, hidden]. Returns o [T, hidden]."""
        qkv, residual = self.project(input_ids, g)
        return self.feed_forward(self.self_attn(positions, qkv, meta), residual)

    def fuse(self, g: torch.Tensor) -> torch.Tensor:
        """The state input g_p: the target's three states [T, 3 x target hidden] fused by fc; the head's own output
        [T, hidden] as it is."""
        return self.fc(g) if g.shape[-1] != self.config.layer.hidden_size else g

    def project(self, input_ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k and v of [norm(embed(token)); norm(g)], the residual g) (g fused first where it is the target's)."""
        g = self.fuse(g)
        e = self.input_layernorm(self.embed_tokens(input_ids))[0]
        normed = self.hidden_norm(g)[0]
        return self.self_attn.qkv_proj(torch.cat([e, normed], dim=-1)), normed if self.config.norm_before_residual else g

    def feed_forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """o from the attention's output (after o_proj) and the residual."""
        m, residual = self.mlp(attended, residual, self.post_attention_layernorm)
        return m + residual

    def draft_logits(self, o: torch.Tensor) -> torch.Tensor:
        """[T, draft vocabulary]"""
        return self.lm_head(self.norm(o)[0])

    def compute_logits(self, o: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, vocab_size] in the target's ids: the draft vocabulary's logits, -inf for every other token."""
        logits = self.draft_logits(o)
        if self.config.draft_vocab_size == vocab_size:
            return logits
        full = logits.new_full((logits.shape[0], vocab_size), float("-inf"))
        full[:, self.draft_to_target] = logits
        return full

    def attach(self, target: nn.Module) -> None:
        """Use the target model's token embedding module (shared, not copied) if the head has none of its own, once
        the head's own weights are in place."""
        if self.embed_tokens is not None:
            return
        c, embedding = self.config.layer, target.embed_tokens
        if embedding.shape != (c.vocab_size, c.hidden_size):
            raise ValueError(f"the EAGLE-3 head cannot share the target's embedding {embedding.shape} "
                             f"(it reads {(c.vocab_size, c.hidden_size)})")
        self.embed_tokens = embedding

    # checkpoint name -> (parameter, shard index) for the layer's fused projections
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The head's tensors as published (`midlayer.*`, or `layers.0.*`; `fc`, `norm`, `lm_head`, `d2t`; `t2d`, the
        inverse map, is not needed); `embed_tokens.weight` where the head has its own."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int | None]] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.").replace("midlayer.", "").replace("layers.0.", "")
            if name == "t2d":
                continue
            if name == "d2t":
                self.draft_to_target += tensor.to(self.draft_to_target)
                loaded.add(("d2t", None))
                continue
            loaded.add(load_checkpoint_tensor(params, name, tensor, self.packed, "the EAGLE-3 head"))
        if ("d2t", None) not in loaded and self.config.draft_vocab_size < self.config.layer.vocab_size:
            raise ValueError("EAGLE-3 head checkpoint is missing 1 tensors, e.g. d2t (the draft vocabulary's target ids)")
        check_all_loaded(params, loaded - {("d2t", None)})
        finish_loading(self)
