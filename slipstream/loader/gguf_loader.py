"""GGUF files: metadata -> HF-style config, tensors dequantized (with the `gguf` package) into the HF layout.

llama.cpp's converter permutes the rows of Llama's Q and K projections so that its RoPE can rotate adjacent
pairs (GPT-J style); our RoPE rotates halves (NeoX style, as in HF), so those rows are permuted back here.
Qwen2/Qwen3 GGUFs keep the NeoX layout and are not permuted.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import numpy as np
import torch

from slipstream.config import ModelConfig
from slipstream.models import MODEL_TYPES


_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_NAMES[part]}.{suffix}"
    return f"{_NAMES[base]}.{suffix}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in MODEL_TYPES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(MODEL_TYPES)}")
    names = {t.name for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = {
        "architectures": [MODEL_TYPES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor and _field(reader, f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return cfg


def gguf_weights(reader: Any, config: ModelConfig, permute: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.array(t.data, dtype=np.float32)  # copy: the reader maps the file read-only
        else:
            arr = dequantize(t.data, t.tensor_type)
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))  # ggml lists dims innermost first
        if permute and t.name.endswith("attn_q.weight"):
            arr = unpermute_qk(arr, config.num_heads)
        elif permute and t.name.endswith("attn_k.weight"):
            arr = unpermute_qk(arr, config.num_kv_heads)
        yield hf_name(t.name), torch.from_numpy(np.ascontiguousarray(arr))


def open_gguf(path: str) -> tuple[dict[str, Any], ModelConfig, Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """The HF-style config dict, the model config and a weight iterator (HF names and layout) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    hf_config = gguf_config(reader)
    config = ModelConfig.from_hf(hf_config)
    permute = _field(reader, "general.architecture") == "llama"
    return hf_config, config, lambda: gguf_weights(reader, config, permute)
