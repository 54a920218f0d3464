"""Model registry: HF architecture name -> module class, the one list of what slipstream runs.

Torch-free (classes are imported when built), so that configs are checked without importing a model."""
from __future__ import annotations

import importlib
from typing import Any

# Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm) are the Llama block with a flag that ModelConfig derives; their MoE
# variants and Mixtral swap the feed-forward of some or all layers for layers/moe.py (ModelConfig.moe); GLM-4.5 is
# the Llama block with partial RoPE and DeepSeek-V3's MoE (sigmoid routing over groups, shared experts).
ARCHITECTURES = {
    "LlamaForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "Qwen2MoeForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
    "Glm4MoeForCausalLM": "slipstream.models.llama:LlamaForCausalLM",
}
# HF `model_type` (and GGUF `general.architecture`) -> architecture, for configs that name no architecture.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}


def check_architecture(arch: str, described_as: str = "") -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch or described_as!r}; supported: {', '.join(ARCHITECTURES)}")


def model_class(arch: str) -> Any:
    check_architecture(arch)
    module, name = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), name)
