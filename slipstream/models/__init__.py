"""Model registry: HF architecture name -> module class."""
from __future__ import annotations

from torch import nn

from slipstream.attention import AttentionBackend
from slipstream.config import ModelConfig
from slipstream.models.llama import LlamaForCausalLM

# Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm) are the Llama block with a flag that ModelConfig derives.
_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def build_model(cfg: ModelConfig, backend: AttentionBackend) -> nn.Module:
    try:
        cls = _REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(_REGISTRY)}") from None
    return cls(cfg, backend)
