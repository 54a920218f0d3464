"""Frozen configuration dataclasses, built once at engine start and validated when built.

`ModelConfig` describes the transformer (read from an HF config.json or GGUF metadata); `CacheConfig`,
`SchedulerConfig` and `EngineConfig` describe how the engine runs it. Their fields are the one table of engine
options: each is declared with `option(...)` (default, help, choices), and `LLM` keywords, CLI flags and the
server's flags all derive from `ENGINE_OPTIONS`.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any

from slipstream.attention.registry import BACKENDS, COMPUTE_DTYPES, backend_spec
from slipstream.layers.quantization import METHODS as QUANTIZATION_METHODS
from slipstream.layers.quantization import QuantSpec, parse_quantization_config

from slipstream.models import MODEL_TYPES, check_architecture



@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward (layers/moe.py says what each routing option does)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    renormalize: bool = True  # the k weights are rescaled to sum to one
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    num_groups: int = 1  # grouped selection (DeepSeek): only the best `topk_groups` groups of experts are eligible
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # a learned per-expert bias added to the scores for selection only
    shared_intermediate_size: int = 0  # a shared expert every token uses (0: none)
    shared_gate: bool = False  # the shared expert's output is scaled by sigmoid(a learned gate)
    shared_name: str = "shared_expert"  # what checkpoints call it ("shared_experts": DeepSeek-V3, GLM-4.5)
    router_float32: bool = False  # the router's weights and logits in float32 (GLM-4.5: selection is that sensitive)
    layers: tuple[int, ...] = ()  # decoder layers whose feed-forward is this MoE (the others are dense), MTP layers included

    def __post_init__(self) -> None:
        _check(1 <= self.top_k <= self.num_experts, "num_experts_per_tok", f"must be in [1, {self.num_experts}]", self.top_k)
        _check(self.scoring in ("softmax", "sigmoid"), "scoring_func", "must be softmax or sigmoid", self.scoring)
        _check(self.num_experts % self.num_groups == 0 and 1 <= self.topk_groups <= self.num_groups, "topk_group",
               f"must be in [1, n_group] with n_group dividing {self.num_experts}", (self.num_groups, self.topk_groups))
        per = self.num_experts // self.num_groups
        _check(self.top_k <= self.topk_groups * per, "num_experts_per_tok",
               f"must be at most the experts of the topk_group groups a token may use ({self.topk_groups} x {per})",
               self.top_k)
        _check(not (self.correction_bias and self.num_groups > 1 and per < 2), "n_group",
               "must leave at least two experts a group (a group is scored by its two best)", self.num_groups)


def _moe_config(arch: str, cfg: dict[str, Any], num_layers: int) -> MoEConfig | None:
    """`num_layers`: the decoder layers of the checkpoint, those of its MTP modules included."""
    if arch == "Glm4MoeForCausalLM":  # DeepSeek-V3's routing and shared experts; the first k layers dense
        return MoEConfig(cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                         cfg.get("norm_topk_prob", True), "sigmoid", cfg.get("n_group", 1), cfg.get("topk_group", 1),
                         cfg.get("routed_scaling_factor", 1.0), correction_bias=True,
                         shared_intermediate_size=cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 1),
                         shared_name="shared_experts", router_float32=True, layers=tuple(range(cfg.get("first_k_dense_replace", 1), num_layers)))
    if arch == "MixtralForCausalLM":
        return MoEConfig(cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"],
                         layers=tuple(range(num_layers)))
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # the hub's name; transformers 5 writes the other
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        layers = tuple(i for i in range(num_layers) if i not in dense and experts and (i + 1) % step == 0)
        shared = cfg.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
        return MoEConfig(experts, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                         cfg.get("norm_topk_prob", False), shared_intermediate_size=shared, shared_gate=bool(shared),
                         layers=layers)
    return None


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
    partial_rotary_factor: float = 1.0  # RoPE rotates this fraction of each head's dims (the first ones)
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # frozen form of the HF rope_scaling dict
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # the checkpoint's own dtype
    quantization: QuantSpec = QuantSpec()  # what the checkpoint's linear layers hold
    moe: MoEConfig | None = None  # Mixture-of-Experts feed-forward, in the layers it names
    # multi-token prediction modules (DeepSeek-V3, GLM-4.5) the checkpoint stores after its layers (layers L, L + 1, ..)
    num_mtp_layers: int = 0

    def __post_init__(self) -> None:
        _check(self.num_heads > 0 and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
               "num_key_value_heads", f"must divide num_attention_heads ({self.num_heads})", self.num_kv_heads)
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "must be even and > 0 (without a head_dim, "
               f"hidden_size / num_attention_heads)", self.head_dim)
        rot = self.head_dim * self.partial_rotary_factor
        _check(0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0, "partial_rotary_factor",
               f"must leave an even number of the {self.head_dim} head dims rotating", self.partial_rotary_factor)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else MODEL_TYPES.get(cfg.get("model_type", ""), "")
        check_architecture(arch, cfg.get("model_type", ""))
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        # GLM-4.5 rotates half of each head (transformers' default for it, where its config names no fraction)
        partial = cfg.get("partial_rotary_factor", rope.pop("partial_rotary_factor", 0.5 if arch == "Glm4MoeForCausalLM" else 1.0))
        rope_scaling = dict(cfg.get("rope_scaling") or rope)
        rope_scaling.pop("partial_rotary_factor", None)
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
        rope_scaling = {} if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        mtp = cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0
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
            attention_bias=next((cfg[k] for k in ("attention_bias", "qkv_bias") if cfg.get(k) is not None),
                                arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") or bool(cfg.get("use_qk_norm")),
            partial_rotary_factor=float(partial),
            rope_scaling=tuple(sorted(rope_scaling.items())),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quantization=parse_quantization_config(cfg.get("quantization_config")),
            moe=_moe_config(arch, cfg, cfg["num_hidden_layers"] + mtp),
            num_mtp_layers=mtp,
        )


EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")  # the published heads' names


@dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 draft head (Li et al., arXiv 2503.01840): one Llama decoder layer whose attention reads the token's
    embedding beside a hidden state, the target's hidden states from three layers fused by a linear map (`fc`), and a
    head over a reduced draft vocabulary mapped back to the target's ids. HF format as the heads are published
    (config.json: `draft_vocab_size`, `target_hidden_size`, `eagle_aux_hidden_state_layer_ids` or
    `eagle_config.eagle_aux_hidden_state_layer_ids`)."""

    layer: ModelConfig  # the decoder layer's shape (one layer, Llama-style)
    draft_vocab_size: int
    target_hidden_size: int
    # target layers whose inputs it reads, side by side in layer order whatever order they are named in (as heads are
    # trained); None: early, middle, late (2, L // 2, L - 3)
    aux_layers: tuple[int, ...] | None
    norm_before_residual: bool = False  # the residual is the normed hidden state (some trainers' variant)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "Eagle3Config":
        arch = (cfg.get("architectures") or [""])[0]
        if arch not in EAGLE3_ARCHITECTURES:
            raise ValueError(f"not an EAGLE-3 head: architecture {arch!r}, expected one of {', '.join(EAGLE3_ARCHITECTURES)}")
        _check(cfg.get("num_hidden_layers", 1) == 1, "num_hidden_layers", "of an EAGLE-3 head must be 1", cfg.get("num_hidden_layers"))
        layer = ModelConfig.from_hf({**cfg, "architectures": ["LlamaForCausalLM"], "quantization_config": None})
        aux = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        _check(aux is None or len(set(aux)) == len(aux) == 3, "eagle_aux_hidden_state_layer_ids", "must name 3 layers",
               aux)
        draft_vocab = cfg.get("draft_vocab_size") or layer.vocab_size
        _check(1 <= draft_vocab <= layer.vocab_size, "draft_vocab_size", f"must be in [1, {layer.vocab_size}]", draft_vocab)
        return cls(layer, draft_vocab, cfg.get("target_hidden_size") or layer.hidden_size,
                   None if aux is None else tuple(int(i) for i in aux), bool(cfg.get("norm_before_residual", False)))

    def aux_layers_of(self, num_layers: int) -> tuple[int, ...]:
        """The target's layers (of `num_layers`) whose input hidden states the head reads."""
        aux = self.aux_layers or (2, num_layers // 2, num_layers - 3)
        _check(len(set(aux)) == 3 and all(0 <= i < num_layers for i in aux), "eagle_aux_hidden_state_layer_ids",
               f"must be 3 layers of the target (0..{num_layers - 1})", aux)
        return aux


def option(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:  # noqa: A002
    """A config field that is also an engine option (keyword of `LLM`, flag of the CLI)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(64, "tokens per KV-cache page (the triton backend takes 16..256, a power of two; "
                                 "Hopper's prefill fetches whole pages of 64+ by TMA)")
    gpu_memory_utilization: float = option(0.9, "GPU: fraction of device memory for weights, activations and KV cache")
    kv_cache_bytes: int | None = option(None, "bytes for the KV cache (CPU default: 1 GiB; GPU: what memory allows)")
    num_blocks: int | None = option(None, "exact number of KV pages (overrides the byte budget)")
    enable_prefix_caching: bool = option(True, "share the KV pages of common prompt prefixes across requests")
    kv_cache_dtype: str = option("auto", "how the KV cache stores keys and values: auto (the compute dtype), fp8 "
                                         "(E4M3 with a scale per token and head, computed as each is written: half "
                                         "the bytes of 16-bit, no calibration)", ("auto", "fp8"))

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "block_size", "must be >= 1", self.block_size)
        _check(self.kv_cache_dtype in ("auto", "fp8"), "kv_cache_dtype", "must be one of: auto, fp8", self.kv_cache_dtype)
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]", self.gpu_memory_utilization)
        _check(self.kv_cache_bytes is None or self.kv_cache_bytes >= 1, "kv_cache_bytes", "must be >= 1", self.kv_cache_bytes)
        _check(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", "must be >= 1", self.num_blocks)


@dataclass(frozen=True)
class SchedulerConfig:
    # 1024, as vLLM on GPUs of 70 GB and more: a saturated server runs every admitted request in one batch (at 400
    # requests at once, 256 would leave 144 waiting while the GPU has room); the KV pool, not this, bounds it below
    max_num_seqs: int = option(1024, "most sequences in one step")
    max_num_batched_tokens: int = option(8192, "token budget of one step (prefills are chunked to it)")
    max_model_len: int | None = option(None, "longest sequence, prompt and output (default: the model's own)")
    cache_aware: bool = option(True, "admit waiting requests with the longest cached prefix first")
    max_wait_steps: int = option(64, "steps after which a waiting request goes first regardless of cache hits")
    max_waiting: int = option(4096, "queued sequences beyond which new requests are refused (overloaded)")
    max_decode_stall: float = option(0.25, "seconds a step may take while streams decode: sizes prefill chunks from "
                                           "the measured cost per token (0: no limit)")

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1", self.max_num_seqs)
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1", self.max_num_batched_tokens)
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2", self.max_model_len)
        _check(self.max_wait_steps >= 1, "max_wait_steps", "must be >= 1", self.max_wait_steps)
        _check(self.max_waiting >= 1, "max_waiting", "must be >= 1", self.max_waiting)
        _check(self.max_decode_stall >= 0, "max_decode_stall", "must be >= 0", self.max_decode_stall)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF dir, .gguf file, or None for the embedded SmolLM2 (a positional argument)
    tokenizer: str | None = option(None, "tokenizer directory (default: the model's)")
    load_format: str = option("auto", "how to read the model", ("auto", "hf", "gguf", "dummy"))
    dtype: str = option("auto", "compute dtype (auto: float32 on CPU, the checkpoint's 16-bit type on GPU)",
                        ("auto", *COMPUTE_DTYPES))
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    attention_backend: str = option("auto", "attention kernels (auto: triton on CUDA, torch elsewhere)", ("auto", *BACKENDS))
    quantization: str = option("auto", "weights of the linear layers: auto (as the checkpoint holds them; GGUF "
                                       "files load dequantized), none (16-bit), fp8 (FP8 E4M3 W8A8), int4 (4-bit "
                                       "weights, W4A16: a GGUF file's Q4_0 / Q4_1 / Q4_K layers as stored, its Q5 / Q6_K / "
                                       "Q8_0 ones as 8-bit; other checkpoints rounded per group of 128 at load)",
                               QUANTIZATION_METHODS)
    quantize_lm_head: bool = option(False, "round a 16-bit output head to the run's weight format too (fp8: FP8 per "
                                           "output row; int4: 4-bit groups, as the layers are rounded at load), a "
                                           "tied one as a copy beside the 16-bit embedding: the head is 1/8 of "
                                           "Llama-3.1-8B's bytes a token, more of a 4-bit model's; off, it keeps its "
                                           "16 bits (its error lands on every logit)")
    enforce_eager: bool = option(False, "no CUDA graphs")
    async_scheduling: str = option("auto", "launch step N + 1 before reading step N's tokens, so the GPU never waits "
                                           "for the host (auto: on for CUDA)", ("auto", "on", "off"))
    speculative_method: str = option("none", "speculative decoding: ngram proposes drafts by prompt lookup, draft by a "
                                             "smaller model (speculative_model), eagle3 by an EAGLE-3 head "
                                             "(speculative_model) reading the target's hidden states, mtp by the "
                                             "model's own multi-token prediction module (GLM-4.5); verified in one "
                                             "step, the output is exactly that without it",
                                     ("none", "ngram", "draft", "eagle3", "mtp"))
    speculative_model: str | None = option(None, "the draft model of speculative_method=draft (an HF directory or a "
                                                 ".gguf file with the target's token ids), or the EAGLE-3 head's HF "
                                                 "directory of speculative_method=eagle3")
    num_speculative_tokens: int = option(4, "draft tokens per step with speculative decoding (at most: see "
                                            "speculative_adaptive)")
    speculative_branches: int = option(1, "token trees of num_speculative_tokens drafts verified in one step: n-gram "
                                          "drafting merges the continuations of the matched n-gram's last N "
                                          "occurrences; a draft head (eagle3, mtp) puts its draws' N - 1 runners-up "
                                          "beside its chain where the measured rates say they pay; 1: one chain")
    speculative_adaptive: bool = option(True, "choose each step's drafts per sequence (0 .. num_speculative_tokens) "
                                              "from the output tokens/s measured at that batch size, so speculation "
                                              "turns itself off where it does not pay; off: always "
                                              "num_speculative_tokens")
    tensor_parallel_size: int = option(1, "ranks the model is split over (processes; on CUDA one GPU each), "
                                          "16-bit, FP8 or 4-bit weights")
    enable_expert_parallel: bool = option(False, "MoE layers: each rank holds whole experts (a 1/N share of them) "
                                                 "instead of a 1/N slice of every expert")
    nnodes: int = option(1, "hosts the tensor-parallel ranks span: the engine's host starts tensor_parallel_size / "
                            "nnodes of them, each other host `slipstream worker --node-rank R` (MASTER_ADDR and "
                            "MASTER_PORT set alike on every host)")
    distributed_timeout_s: float = option(600.0, "tensor parallel: seconds a rank waits for the others in one "
                                                 "collective, the model's load included, before the engine fails "
                                                 "(an idle engine keeps its ranks waiting with a message every "
                                                 "quarter of it)")
    seed: int = option(0, "seed of the engine (random weights, requests without a seed)", flag="--engine-seed")
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        for name in ("load_format", "dtype", "attention_backend", "quantization", "async_scheduling", "speculative_method"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            value = getattr(self, name)
            _check(value in choices, name, f"must be one of: {', '.join(choices)}", value)
        _check(not (self.quantize_lm_head and self.quantization == "none"), "quantize_lm_head",
               "rounds the output head to the run's weight format: it needs quantization fp8, int4 or auto (a "
               "checkpoint that holds them)", self.quantize_lm_head)
        _check(self.num_speculative_tokens >= 1, "num_speculative_tokens", "must be >= 1", self.num_speculative_tokens)
        _check(self.speculative_branches >= 1, "speculative_branches", "must be >= 1", self.speculative_branches)
        _check(self.speculative_branches == 1 or self.speculative_method in ("ngram", "eagle3", "mtp"), "speculative_branches",
               f"> 1 builds token trees from n-gram drafts or a draft head's: it needs speculative_method 'ngram', "
               f"'eagle3' or 'mtp', not {self.speculative_method!r}", self.speculative_branches)
        # (a tree's step is at most 63 rows: a row's ancestor mask is one int64 whose sign marks a causal row)
        _check(self.speculative_branches == 1 or self.num_speculative_tokens <= 62, "num_speculative_tokens",
               "must be <= 62 with token trees (speculative_branches > 1)", self.num_speculative_tokens)
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1", self.tensor_parallel_size)
        _check(self.distributed_timeout_s > 0, "distributed_timeout_s", "must be > 0", self.distributed_timeout_s)
        _check(self.nnodes >= 1 and self.tensor_parallel_size % self.nnodes == 0, "nnodes",
               f"must be >= 1 and divide tensor_parallel_size={self.tensor_parallel_size}", self.nnodes)
        modelled = self.speculative_method in ("draft", "eagle3")
        if self.tensor_parallel_size > 1 and self.speculative_method in ("draft", "eagle3", "mtp"):
            raise ValueError(f"speculative_method={self.speculative_method!r} does not run with tensor_parallel_size > 1 yet")
        if modelled != (self.speculative_model is not None):
            raise ValueError("speculative_method 'draft' or 'eagle3' and speculative_model go together: the draft model "
                             f"or head is named by speculative_model (got speculative_method={self.speculative_method!r}, "
                             f"speculative_model={self.speculative_model!r})")
        if self.speculative_method not in ("none", "ngram") and self.async_scheduling == "on":
            raise ValueError(f"async_scheduling='on' cannot be combined with speculative_method="
                             f"{self.speculative_method!r}: its drafter keeps its own state step by step (n-gram "
                             "drafting overlaps the steps it does not draft for)")
        if self.attention_backend != "auto":  # 'auto' is checked against the backend it becomes, at start
            backend_spec(self.attention_backend).check_block_size(self.cache.block_size)

    @classmethod
    def from_options(cls, model: str | None = None, **options: Any) -> "EngineConfig":
        """Flat keyword options (as `LLM` and the CLI take them) -> the nested frozen config. `speculative_config`
        (a dict, or its JSON text) gives the speculative options the way vLLM's option of that name does."""
        spec = options.pop("speculative_config", None)
        if spec is not None:
            options.update(_speculative_options(spec, options))
        parts: dict[type, dict[str, Any]] = {EngineConfig: {"model": model}, CacheConfig: {}, SchedulerConfig: {}}
        for key, value in options.items():
            if key not in ENGINE_OPTIONS:
                raise ValueError(f"unknown engine option {key!r}; known: {', '.join(sorted(ENGINE_OPTIONS))}")
            parts[ENGINE_OPTIONS[key].owner][key] = ENGINE_OPTIONS[key].typed(value)
        return EngineConfig(**parts[EngineConfig], cache=CacheConfig(**parts[CacheConfig]),
                            scheduler=SchedulerConfig(**parts[SchedulerConfig]))


# vLLM's --speculative-config keys and methods -> ours
_SPECULATIVE_KEYS = {"method": "speculative_method", "model": "speculative_model",
                     "num_speculative_tokens": "num_speculative_tokens", "adaptive": "speculative_adaptive",
                     "branches": "speculative_branches"}
_SPECULATIVE_METHODS = {"ngram": "ngram", "draft_model": "draft", "draft": "draft", "eagle3": "eagle3", "mtp": "mtp",
                        "deepseek_mtp": "mtp", "glm4_moe_mtp": "mtp"}


def _speculative_options(spec: Any, given: dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    _check(isinstance(spec, dict), "speculative_config", "must be a JSON object", spec)
    unknown = sorted(set(spec) - set(_SPECULATIVE_KEYS))
    _check(not unknown, "speculative_config", f"takes the keys {', '.join(_SPECULATIVE_KEYS)}; unknown", unknown)
    out = {_SPECULATIVE_KEYS[k]: ENGINE_OPTIONS[_SPECULATIVE_KEYS[k]].typed(v, f"speculative_config.{k}")
           for k, v in spec.items()}
    if "speculative_method" in out:
        method = out["speculative_method"]
        _check(method in _SPECULATIVE_METHODS, "speculative_config.method",
               f"must be one of {', '.join(_SPECULATIVE_METHODS)}", method)
        out["speculative_method"] = _SPECULATIVE_METHODS[method]
    for name, value in out.items():  # the same option given twice must agree
        _check(given.get(name) in (None, value, ENGINE_OPTIONS[name].default), name,
               f"is given both alone and in speculative_config ({value!r})", given.get(name))
    return out


@dataclass(frozen=True)
class Option:
    name: str
    owner: type
    default: Any
    type: type  # int, float, str or bool
    optional: bool  # None is allowed
    help: str
    choices: tuple | None
    flag: str  # the CLI flag

    def typed(self, value: Any, name: str | None = None) -> Any:
        """`value`, checked to be of the option's type (a bool for a bool: "yes" or 1 would pass as true; a path for
        a string, as its text), else a ValueError naming the option (or `name`)."""
        if value is None and self.optional:
            return value
        if self.type is str and isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
              float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)}[self.type](value)
        kind = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}[self.type]
        _check(ok, name or self.name, f"must be {kind}{' or None' if self.optional else ''}", value)
        return value


def _options() -> dict[str, Option]:
    table = {}
    for owner in (EngineConfig, CacheConfig, SchedulerConfig):
        for f in fields(owner):
            if "help" not in f.metadata:
                continue  # the model (positional) and the nested configs
            kinds = [k.strip() for k in str(f.type).split("|")]
            base = {"int": int, "float": float, "str": str, "bool": bool}[kinds[0]]
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            table[f.name] = Option(f.name, owner, f.default, base, "None" in kinds, f.metadata["help"], f.metadata["choices"], flag)
    return table


ENGINE_OPTIONS = _options()
