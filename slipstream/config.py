"""Frozen configuration dataclasses, built once at engine start.

`ModelConfig` describes the transformer (read from an HF config.json or GGUF metadata); `CacheConfig`,
`SchedulerConfig` and `EngineConfig` describe how the engine runs it. CLI and server flags map onto
`EngineConfig` field by field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # frozen form of the HF rope_scaling dict
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # the checkpoint's own dtype

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch or cfg.get('model_type')!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_scaling = dict(cfg.get("rope_scaling") or rope)
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
        rope_scaling = {} if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=tuple(sorted(rope_scaling.items())),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 64  # tokens per KV page; a multiple of 64 lets Hopper prefill fetch key tiles by TMA
    # GPU: fraction of total device memory the engine may use (weights + activations + KV cache).
    gpu_memory_utilization: float = 0.9
    # CPU (or an explicit override on GPU): bytes reserved for the KV cache.
    kv_cache_bytes: int | None = None
    num_blocks: int | None = None  # exact override, mainly for tests
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # Waiting requests are reordered by cached-prefix length, but one that has waited this many steps goes first.
    cache_aware: bool = True
    max_wait_steps: int = 64
    max_waiting: int = 4096  # admission bound; beyond it add_request raises EngineOverloaded
    # Seconds a step may take while sequences are decoding: prefill chunks are then sized to it from the measured
    # cost per token, so a long prompt cannot stall running streams (0: no limit; chunks up to the token budget).
    max_decode_stall: float = 0.25


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or None for the embedded SmolLM2
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | hf | gguf | dummy
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | torch | triton
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
