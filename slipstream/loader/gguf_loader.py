"""GGUF files: metadata -> HF-style config, tensors dequantized (with the `gguf` package) into the HF layout, or
Q4_0 / Q4_1 / Q4_K projections kept 4-bit, repacked into the int4 layout (layers/quantization/int4.py).

MoE files (qwen3moe, qwen2moe; llama with experts: Mixtral) store each layer's experts as one 3-D tensor per
projection (`ffn_gate_exps` [E, I, H], ...): they are handed out per expert, under the HF names.

A layer stays 4-bit when every GGUF tensor fused into it (q, k, v; gate, up) is Q4_0, Q4_1 or Q4_K; the config's
`quantization_config` names the others, which load dequantized (mixes such as Q4_K_M give some projections more
bits or other block formats).

llama.cpp's converter permutes the rows of Llama's Q and K projections so that its RoPE can rotate adjacent
pairs (GPT-J style); our RoPE rotates halves (NeoX style, as in HF), so those rows are permuted back here.
Qwen2/Qwen3 GGUFs keep the NeoX layout and are not permuted.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from slipstream.config import ModelConfig
from slipstream.loader.progress import progress
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
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}  # [E, rows, cols]
# GGUF architectures whose name is not the HF model type (a llama file with experts is Mixtral)
_GGUF_ARCHITECTURES = {"qwen3moe": "Qwen3MoeForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM"}


# GGUF projections fused into one of our layers: kept 4-bit or 8-bit together, or rounded together (a MoE layer's
# experts: gate | up and down each in its form, or all three rounded)
_FUSED = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",),
          ("ffn_gate_shexp", "ffn_up_shexp"), ("ffn_down_shexp",), ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
_PROJECTIONS = {part for group in _FUSED for part in group if part not in _EXPERTS}  # (not embeddings, norms)
_Q4 = ("Q4_0", "Q4_1", "Q4_K")
_WIDE = ("Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K")  # kept 8-bit (wide_blocks), as are 4-bit ones fused with them
_K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")  # their scales (d times a 6- or 8-bit scale) need float32
_OFFSET_KINDS = ("Q4_1", "Q4_K", "Q5_1", "Q5_K")  # w = q * scale + offset
_BLOCK = 32  # weights per Q4_0 / Q4_1 block, and per sub-block of a Q4_K super-block


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


class GGUFIndex:
    """What the loader reads of a GGUF file: its metadata values and where each tensor lies, in one pass over the
    header that steps over the contents of arrays (the tokenizer's vocabulary and merges: the tokenizer is read
    elsewhere). gguf's GGUFReader builds a numpy view of every array element: 3.7 s of a 7.5 s start for the
    embedded model's 49,152-token vocabulary. `fields`: key -> value, arrays as their element count. `tensors`:
    (name, shape innermost first, type, data) with data a view of one read-only memory map, laid out as
    GGUFReader lays it out (float types typed; block-quantized ones as bytes, one row of blocks per row)."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: str) -> None:
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f:
            head = f.read(24)  # magic, version, tensor and field counts
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic at its start)")
        if head[4:8] in (b"\0\0\0\2", b"\0\0\0\3"):
            raise ValueError(f"{path!r} is a big-endian GGUF file; only little-endian ones are supported")
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        buf, self._pos = memoryview(self._map), 0
        self._unpack = lambda fmt: struct.unpack_from(fmt, buf, self._take(struct.calcsize(fmt)))[0]
        self._take(4)
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", 32)) or 32
        start = -(-self._pos // align) * align
        typed = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}
        self.tensors = []
        for name, dims, kind, offset in infos:
            rows = tuple(reversed(dims[1:]))
            if kind.name in typed:
                dtype = np.dtype(typed[kind.name])
                shape = (*rows, dims[0])
            else:
                block, size = GGML_QUANT_SIZES[kind]
                dtype, shape = np.dtype(np.uint8), (*rows, dims[0] // block * size)
            n = int(np.prod(shape)) * dtype.itemsize
            if start + offset + n > len(self._map):
                raise ValueError(f"{path!r} is truncated: tensor {name} ends at byte {start + offset + n}, the file "
                                 f"has {len(self._map)} (an interrupted download?)")
            data = self._map[start + offset : start + offset + n].view(dtype).reshape(shape)
            self.tensors.append(GGUFTensor(name, tuple(dims), kind, data))

    def _take(self, n: int) -> int:
        at, self._pos = self._pos, self._pos + n
        if self._pos > len(self._map):
            raise ValueError(f"{self.path!r} is truncated: its header runs past the file's {len(self._map)} bytes (an "
                             "interrupted download?)")
        return at

    def _string(self) -> str:
        n = self._unpack("<Q")
        return bytes(self._map[self._take(n) : self._pos]).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind == self._STRING:
            return self._string()
        if kind not in self._SCALARS and kind != self._ARRAY:
            raise ValueError(f"{self.path!r}: unknown GGUF value type {kind} in its metadata")
        if kind != self._ARRAY:
            return self._unpack(self._SCALARS[kind])
        elem, count = self._unpack("<I"), self._unpack("<Q")
        if elem == self._STRING:
            for _ in range(count):
                self._take(self._unpack("<Q"))
        elif elem == self._ARRAY:
            for _ in range(count):
                self._value(self._ARRAY)
        elif elem in self._SCALARS:
            self._take(count * np.dtype(self._SCALARS[elem]).itemsize)
        else:
            raise ValueError(f"{self.path!r}: unknown GGUF array element type {elem} in its metadata")
        return count


class GGUFTensor:
    __slots__ = ("name", "shape", "tensor_type", "data")

    def __init__(self, name: str, shape: tuple[int, ...], tensor_type: Any, data: np.ndarray) -> None:
        self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data


def _field(index: GGUFIndex, key: str, default: Any = None) -> Any:
    return index.fields.get(key, default)


def _experts_module(layer: int | str) -> str:
    """The checkpoint module a quantization's ignore list names for a MoE layer's experts (an expert's gate and
    up projections stand for all of them)."""
    return f"model.layers.{layer}.mlp.experts.0.gate_proj"


def gguf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    experts = _field(reader, f"{arch}.expert_count", 0)
    hf_arch = _GGUF_ARCHITECTURES.get(arch) or ("MixtralForCausalLM" if arch == "llama" and experts else MODEL_TYPES.get(arch))
    if hf_arch is None:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join([*MODEL_TYPES, *_GGUF_ARCHITECTURES])}")
    names = {t.name for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    vocab = _field(reader, f"{arch}.vocab_size") or _field(reader, "tokenizer.ggml.tokens")  # an array: its length
    cfg = {
        "architectures": [hf_arch],
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
    if experts:
        layers = cfg["num_hidden_layers"]
        moe = {"num_experts_per_tok": _field(reader, f"{arch}.expert_used_count"),
               "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]}
        if hf_arch == "MixtralForCausalLM":
            moe["num_local_experts"] = experts
        else:
            moe.update(num_experts=experts, norm_topk_prob=_field(reader, f"{arch}.expert_weights_norm", arch == "qwen3moe"),
                       moe_intermediate_size=_field(reader, f"{arch}.expert_feed_forward_length", cfg["intermediate_size"]),
                       shared_expert_intermediate_size=_field(reader, f"{arch}.expert_shared_feed_forward_length", 0))
        cfg.update(moe)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    kept, wide, rounded, wide_kinds = [], [], [], set()
    for layer in range(cfg["num_hidden_layers"]):
        for group in _FUSED:
            names = [f"blk.{layer}.{part}.weight" for part in group]
            if not any(n in types for n in names):
                continue  # (a dense layer's experts, a MoE layer's MLP)
            if group[0] in _EXPERTS:  # gate | up and down: each 4-bit or 8-bit, or all three rounded
                pairs = [(names[:2], [_experts_module(layer), _experts_module(layer).replace("gate_proj", "up_proj")]),
                         (names[2:], [_experts_module(layer).replace("gate_proj", "down_proj")])]
                if not all(types.get(n) in _Q4 + _WIDE for n in names):
                    rounded.extend(pairs[0][1] + pairs[1][1])
                    continue
            else:
                pairs = [(names, [hf_name(n).removesuffix(".weight") for n in names])]
            for parts, modules in pairs:
                if all(types.get(n) in _Q4 for n in parts):
                    kept.extend(modules)
                elif all(types.get(n) in _Q4 + _WIDE for n in parts):
                    wide.extend(modules)
                    wide_kinds.update(types[n] for n in parts)
                else:
                    rounded.extend(modules)
    # the output projection (a tied one is token_embd) in 8-bit blocks stays 8-bit too, in a file whose projections
    # are kept (one that keeps none rounds them all to 4 bits at load with `int4`, as a 16-bit checkpoint)
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    if (kept or wide) and types.get(head) in _Q4 + _WIDE:
        wide.append("lm_head")
        wide_kinds.add(types[head])
    if kept or wide:
        # Q4_K's scales (d times a 6-bit scale) need 17 bits: float32 scales, for every 4-bit layer of such a file;
        # the 8-bit layers share one form, set by the kinds among them: groups of 16 with Q6_K's sub-blocks, float32
        # scales with a K-quant's, offsets (zeros where a layer's kinds have none, dropped once loaded) with those
        # that have one. Projections of other kinds (F16, Q2_K, Q3_K, ...) load dequantized and `int4` rounds them to 4
        # bits, as it rounds every projection of a file that keeps none.
        cfg["quantization_config"] = {"quant_method": "gguf", "modules_rounded": rounded,
                                      "k_quants": "Q4_K" in types.values(), "modules_8bit": wide,
                                      "wide_group": 16 if "Q6_K" in wide_kinds else 32,
                                      "wide_offsets": bool(wide_kinds & set(_OFFSET_KINDS)),
                                      "wide_fp32": bool(wide_kinds & set(_K_QUANTS))}
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if factor and _field(reader, f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return cfg


def q4_blocks(data: np.ndarray, kind: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q4_1 rows of blocks -> (q uint8 [rows, cols] 0..15, scale float16 [rows, cols / 32], offset float16):
    w = q * scale + offset. A block is d (float16), for Q4_1 m (float16), then 16 bytes: byte j holds weight j in
    its low nibble and weight j + 16 in its high one. Q4_0's w = (q - 8) d is q d + (-8 d), exactly."""
    head = 2 if kind == "Q4_0" else 4
    blocks = np.ascontiguousarray(data).reshape(rows, cols // _BLOCK, head + 16)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else (d.astype(np.float32) * -8).astype(np.float16)
    qs = blocks[..., head:]
    q = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(rows, cols)
    return q, d, m


def q4k_blocks(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows of super-blocks -> (q uint8 [rows, cols] 0..15, scale float32 [rows, cols / 32], offset float32):
    w = q * scale + offset. A super-block of 256 weights is d, dmin (float16), 12 bytes holding eight 6-bit scales
    and eight 6-bit minimums, then 128 bytes: bytes 32j..32j+31 hold sub-block 2j in their low nibbles and 2j + 1 in
    their high ones. Sub-block i: w = d sc_i q - dmin m_i, so scale = d sc_i and offset = -dmin m_i (exact in
    float32: at most 17 significant bits)."""
    blocks = np.ascontiguousarray(data).reshape(rows, cols // 256, 144)
    qs = blocks[..., 16:].reshape(rows, cols // 256, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    return (qs & 15).reshape(rows, cols), *_k_scales(blocks, rows)


def _k_scales(blocks: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks' d, dmin and their 12 bytes of eight 6-bit scales and minimums -> (d sc, -dmin m)
    per sub-block of 32, float32 [rows, sub-blocks]."""
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:16].reshape(*blocks.shape[:2], 3, 4)
    a, b, c = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 48)], axis=-1).astype(np.float32)  # [rows, blocks, 8]
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 48)], axis=-1).astype(np.float32)
    return (d[..., None] * sc).reshape(rows, -1), -(dmin[..., None] * mn).reshape(rows, -1)


def gguf_weights(reader: Any, config: ModelConfig, permute: bool, as_stored: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors; `as_stored`: the 4-bit layers' weights as `qweight` / `scales` / `offsets`, not dequantized."""
    from slipstream.layers.quantization.int4 import pack

    spec = config.quantization
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims innermost first
        layer, _, part = t.name.removeprefix("blk.").rpartition(".weight")[0].partition(".")
        if part in _EXPERTS:
            module = _experts_module(layer).removeprefix("model.")
            kept = as_stored and spec.method == "int4" and not spec.rounds([module])
            wide = kept and spec.keeps_8bit([module.replace("gate_proj", _EXPERTS[part])])
            yield from _expert_tensors(t, shape, f"model.layers.{layer}.mlp.experts", _EXPERTS[part],
                                       (8 if wide else 4) if kept else 0, spec)
            continue
        name = hf_name(t.name)
        if as_stored and t.name in ("output.weight", "token_embd.weight") and spec.keeps_8bit(["lm_head"]) and (
                t.name == "output.weight" or config.tie_word_embeddings):  # the output head (tied: the embedding too)
            q, scale, offset = _stored_parts(t, *shape, spec, wide=True)
            yield "lm_head.qweight", q
            yield "lm_head.scales", scale
            if offset is not None:
                yield "lm_head.offsets", offset
            continue
        heads = config.num_heads if t.name.endswith("attn_q.weight") else config.num_kv_heads
        flip = permute and t.name.endswith(("attn_q.weight", "attn_k.weight"))
        module = name.removeprefix("model.").removesuffix(".weight")
        if as_stored and spec.method == "int4" and part in _PROJECTIONS and not spec.rounds([module]):
            wide = spec.keeps_8bit([module])
            q, scale, offset = _stored_parts(t, *shape, spec, wide)
            if flip:
                q, scale, offset = (None if a is None else unpermute_qk(a, heads) for a in (q, scale, offset))
            base = name.removesuffix(".weight")
            yield f"{base}.qweight", q if wide else pack(q)
            yield f"{base}.scales", scale
            if offset is not None:
                yield f"{base}.offsets", offset
            continue
        arr = dense(t, math.prod(shape[:-1]), shape[-1]).reshape(shape)
        if flip:
            arr = unpermute_qk(arr, heads)
        if name.endswith("shared_expert_gate.weight"):  # (llama.cpp stores the one-row gate as a vector)
            arr = arr.reshape(1, -1)
        yield name, torch.from_numpy(np.ascontiguousarray(arr))


def wide_blocks(data: np.ndarray, kind: str, rows: int, cols: int, group: int, offsets: bool,
                scale_dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of GGUF blocks -> the 8-bit form every kind fits (layers/quantization/int4.py): (q int8 [rows, cols],
    scale [rows, cols / group], offset or None): w = q * scale (+ offset), the gguf package's values exactly (each
    kind's products have at most 19 significant bits: exact in float32; float16 holds Q8_0's, Q5_0's and Q5_1's d and
    m as they are). Signed q and no offset where the kind has none (Q8_0 d q; Q6_K d sc (q - 32); Q5_0 d (q - 16);
    Q4_0 d (q - 8)); q and an offset where it has one (Q5_1, Q4_1: d q + m; Q5_K, Q4_K: d sc q - dmin m); `offsets`:
    zeros where the kind has none (a layer fusing kinds of both sorts). Scales are repeated to `group` (16: Q6_K's
    sub-blocks; the others' are 32)."""
    if kind == "Q8_0":
        blocks = np.ascontiguousarray(data).reshape(rows, cols // 32, 34)
        q, scale, offset = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols), blocks[..., :2].copy().view(np.float16)[..., 0], None
    elif kind == "Q6_K":
        if group != 16:
            raise ValueError(f"Q6_K blocks need groups of 16 columns, got {group}")
        blocks = np.ascontiguousarray(data).reshape(rows, cols // 256, 210)
        ql, qh = blocks[..., :128], blocks[..., 128:192]
        sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)
        # each half of a super-block: low nibbles of its 64 ql bytes are weights 0..63, high nibbles 64..127; its 32
        # qh bytes hold the high bits of weights j, j + 32, j + 64, j + 96 at bits 0, 2, 4, 6
        lo = (ql.reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15
        hi = (qh.reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3
        q = ((lo.reshape(rows, -1, 2, 4, 32) | (hi.reshape(rows, -1, 2, 4, 32) << 4)).astype(np.int8) - 32).reshape(rows, cols)
        scale, offset = (d * sc).reshape(rows, cols // 16), None
    elif kind in ("Q5_0", "Q5_1"):  # d (m), 4 bytes of high bits (bit j: weight j), 16 bytes of nibbles as Q4's
        head = 2 if kind == "Q5_0" else 4
        blocks = np.ascontiguousarray(data).reshape(rows, cols // 32, head + 20)
        d = blocks[..., :2].copy().view(np.float16)[..., 0]
        high = blocks[..., head : head + 4].copy().view(np.uint32)  # [rows, blocks, 1]
        qs = blocks[..., head + 4 :]
        q = (np.concatenate((qs & 15, qs >> 4), axis=-1) | (((high >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8))
        if kind == "Q5_0":
            q, scale, offset = (q.astype(np.int8) - 16).reshape(rows, cols), d, None
        else:
            q, scale, offset = q.astype(np.int8).reshape(rows, cols), d, blocks[..., 2:4].copy().view(np.float16)[..., 0]
    elif kind == "Q5_K":  # d, dmin, 12 bytes of scales as Q4_K's, 32 bytes of high bits (bit j: sub-block j), 128 of nibbles
        blocks = np.ascontiguousarray(data).reshape(rows, cols // 256, 176)
        lo = (blocks[..., 48:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15
        hi = (blocks[..., 16:48].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        q = (lo.reshape(rows, -1, 8, 32) | (hi << 4)).astype(np.int8).reshape(rows, cols)
        scale, offset = _k_scales(blocks, rows)
    elif kind in ("Q4_0", "Q4_1", "Q4_K"):
        q, scale, offset = q4k_blocks(data, rows, cols) if kind == "Q4_K" else q4_blocks(data, kind, rows, cols)
        if kind == "Q4_0":  # d (q - 8): signed, no offset
            q, offset = q.astype(np.int8) - 8, None
        q = q.astype(np.int8)
    else:
        raise ValueError(f"GGUF {kind} blocks are not kept 8-bit")
    if offsets and offset is None:
        offset = np.zeros_like(scale)
    elif not offsets and offset is not None:
        raise ValueError(f"GGUF {kind} blocks need offsets")
    # (repeated twice where a kind's sub-blocks of 32 meet groups of 16)
    scale, offset = ((None if a is None else np.repeat(a.astype(np.float32), cols // group // a.shape[1], axis=-1)
                      .astype(scale_dtype)) for a in (scale, offset))
    return q, scale, offset


_WIDE_KINDS = ("Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q4_0", "Q4_1", "Q4_K")


def dense(t: Any, rows: int, cols: int) -> np.ndarray:
    """Tensor `t` [rows, cols] (in storage order) as float32. The kinds `wide_blocks` reads go through it and q *
    scale + offset, which give the gguf package's values bit for bit (test_wide_blocks_equal_the_gguf_package) in a
    few vectorized passes: the package's own dequantization, a loop over groups of rows, took 1.98 s for the
    embedded model's tensors where this takes 0.67 (2-core CPU). Other kinds: the gguf package."""
    from gguf.quants import dequantize as gguf_dequantize

    from slipstream.layers.quantization.int4 import dequantize

    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return np.array(t.data, dtype=np.float32).reshape(rows, cols)  # (a copy: the reader maps the file read-only)
    if kind not in _WIDE_KINDS:
        return gguf_dequantize(t.data, t.tensor_type).reshape(rows, cols)
    q, scale, offset = (torch.from_numpy(np.ascontiguousarray(a)) for a in
                        wide_blocks(t.data, kind, rows, cols, 16 if kind == "Q6_K" else 32, True, np.float32))
    return dequantize(q, scale, offset, torch.float32).numpy()


def _stored_parts(t: Any, rows: int, cols: int, spec: Any, wide: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tensor `t` [rows, cols] as kept: (q, scale, offset or None), q one integer a weight (unpacked), in the 8-bit
    form of the file's `spec` (`wide`) or the 4-bit one."""
    kind = t.tensor_type.name
    if wide:
        parts = wide_blocks(t.data, kind, rows, cols, spec.wide_group, spec.wide_offsets,
                            np.float32 if spec.wide_fp32 else np.float16)
    else:
        parts = q4k_blocks(t.data, rows, cols) if kind == "Q4_K" else q4_blocks(t.data, kind, rows, cols)
    return tuple(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in parts)


def _expert_tensors(t: Any, shape: tuple[int, ...], prefix: str, proj: str, bits: int,
                    spec: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A MoE layer's stacked [E, rows, cols] projection, one expert at a time: dequantized (`bits` 0), or as the
    4-bit or 8-bit layout's qweight / scales / offsets."""
    from slipstream.layers.quantization.int4 import pack

    experts, rows, cols = shape
    if bits:
        q, scale, offset = (None if a is None else a.view(experts, rows, -1)
                            for a in _stored_parts(t, experts * rows, cols, spec, bits == 8))
        for e in range(experts):
            yield f"{prefix}.{e}.{proj}.qweight", q[e] if bits == 8 else pack(q[e])
            yield f"{prefix}.{e}.{proj}.scales", scale[e]
            if offset is not None:
                yield f"{prefix}.{e}.{proj}.offsets", offset[e]
        return
    arr = torch.from_numpy(dense(t, experts * rows, cols).reshape(shape))
    for e in range(experts):
        yield f"{prefix}.{e}.{proj}.weight", arr[e]


def open_gguf(path: str) -> tuple[dict[str, Any], ModelConfig, Callable[[bool], Iterator[tuple[str, torch.Tensor]]]]:
    """The HF-style config dict, the model config and a weight iterator (HF names and layout; `as_stored`: the
    4-bit layers kept packed) of a GGUF file."""
    reader = GGUFIndex(path)
    hf_config = gguf_config(reader)
    config = ModelConfig.from_hf(hf_config)
    permute = _field(reader, "general.architecture") == "llama"
    # (a tensor-parallel rank narrows the dequantized tensors: GGUF blocks do not slice along rows and columns)
    return hf_config, config, lambda as_stored, lazy=False: progress(gguf_weights(reader, config, permute, as_stored),
                                                                     len(reader.tensors))
