"""Multi-token prediction (MTP) module, as DeepSeek-V3 (arXiv 2412.19437, section 2.2) defines it and GLM-4.5 ships
one: a decoder layer of the model's own kind that predicts the token after next from the model's final state at a
position and the embedding of the token that follows it:

    x    = eh_proj([RMSNorm_e(embed(t_{p+1})); RMSNorm_h(h_p)])
    o    = RMSNorm_out(Block(x))       Block: attention over the module's own KV cache, then the layer's MoE or MLP
    next = argmax lm_head(o)           the embedding and the output head are the model's (shared, as trained)

h_p is the model's final, normed hidden state at p. Drafting k > 1 tokens chains the module on its own output o, the
h of the next position beside the token it just proposed (transformers' MTP drafting feeds o from one module to the
next the same way; a checkpoint with one module reuses it).

Checkpoint tensors: `model.layers.{L + i}.` + `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and the block's own
names, with L the model's num_hidden_layers. The module's copies of the embedding and head (`embed_tokens`,
`shared_head.head`) are not read.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from slipstream.attention.backend import AttentionBackend, AttentionMetadata
from slipstream.config import ModelConfig
from slipstream.layers.linear import Linear, check_all_loaded, finish_loading
from slipstream.layers.norm import RMSNorm
from slipstream.layers.rotary import RotaryEmbedding
from slipstream.models.llama import DecoderLayer, LlamaForCausalLM, MethodFor, load_decoder_tensor, unquantized, unused_tensor
from slipstream.parallel.shard import Shard


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, method_for: MethodFor = unquantized,
                 fused: bool = False, index: int = 0) -> None:
        """The model's `index`-th MTP module; its one attention layer keeps its KV at index 0 of `backend`.
        `method_for`: the model's quantization of its projections (the block's are quantized as the model's are)."""
        super().__init__()
        self.config, h = cfg, cfg.hidden_size
        self.layer = cfg.num_layers + index  # its number in the checkpoint
        rotary = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_dict)
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, fused)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, fused)
        self.eh_proj = Linear(2 * h, h, fused=fused)
        self.mtp_block = DecoderLayer(cfg, self.layer, rotary, backend, method_for, fused, Shard.single(), kv_index=0)
        self.norm = RMSNorm(h, cfg.rms_norm_eps, fused)  # `shared_head.norm`
        self.target: LlamaForCausalLM | None = None  # whose embedding and head it uses (`attach`)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                g: torch.Tensor) -> torch.Tensor:
        """input_ids[i]: the token after position positions[i]; g: the model's final hidden state there, or the
        module's own output at the position before. Returns o [T, hidden] (normed: what the head reads)."""
        e = self.enorm(self.target.embed_tokens(input_ids))[0]
        x = self.eh_proj(torch.cat([e, self.hnorm(g)[0]], dim=-1))
        y, residual = self.mtp_block(positions, x, None, meta)
        return self.norm(y, residual)[0]

    def fuse(self, g: torch.Tensor) -> torch.Tensor:
        """The state input: the model's final state is read as it is, as the module's own output is."""
        return g

    def compute_logits(self, o: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return self.target.compute_logits(o)

    def attach(self, target: LlamaForCausalLM) -> None:
        """Use the model's embedding and output head (not registered as the module's own: they are the model's)."""
        object.__setattr__(self, "target", target)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """From the model's checkpoint tensors, the ones of this module (the others are skipped unread)."""
        params = dict(self.named_parameters())
        prefix = f"layers.{self.layer}."
        own = {"enorm.", "hnorm.", "eh_proj.", "shared_head.norm."}
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if not name.startswith(prefix) or unused_tensor(name):
                continue
            name = name.removeprefix(prefix)
            if name.startswith(("embed_tokens.", "shared_head.head.")):  # copies of the model's
                continue
            if name.startswith(tuple(own)):
                name = name.replace("shared_head.norm.", "norm.")
            else:
                name = "mtp_block." + name
            loaded.add(load_decoder_tensor(params, name, tensor, f"MTP module {self.layer}"))
        check_all_loaded(params, loaded)
        del params
        finish_loading(self)
