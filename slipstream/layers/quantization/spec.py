"""What a model's linear layers hold (`QuantSpec`): read from a checkpoint's `quantization_config`
(`parse_quantization_config`) and reconciled with the `quantization` option (`resolve_quantization`): an FP8
checkpoint runs as stored; `fp8` asked of a 16-bit checkpoint quantizes its weights at load. Torch-free: the
engine config parses specs without loading torch."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# "auto": whatever the checkpoint holds; "none": 16-bit weights; "fp8": FP8 E4M3 weights and activations (W8A8);
# "int4": 4-bit integer weights with a scale and an offset per group, 16-bit activations (W4A16).
METHODS = ("auto", "none", "fp8", "int4")
INT4_GROUP = 128  # columns per scale when int4 quantizes a 16-bit checkpoint at load


@dataclass(frozen=True)
class QuantSpec:
    method: str = "none"  # "none" | "fp8" | "int4"
    # How weight scales are laid out: one per tensor (per stacked shard), one per output channel, or one per
    # block of `block` = (rows, columns) weights (DeepSeek-V3 / Qwen3-FP8: 128 x 128).
    weight_scales: str = "channel"
    block: tuple[int, int] = (128, 128)
    # "dynamic": activation scales computed per token as the step runs (per token and 128-column group for
    # block-scaled weights); "static": one calibrated scale per layer from the checkpoint (`input_scale`; NVFP4:
    # the checkpoint quantizes activations too and holds `input_global_scale`).
    activations: str = "dynamic"
    serialized: bool = False  # the checkpoint holds FP8 weights; False: 16-bit weights quantized at load
    scale_name: str = "weight_scale"  # the checkpoint's name of the weight scale ("weight_scale_inv" in HF block FP8)
    ignore: tuple[str, ...] = ()  # checkpoint module names kept in 16 bits ("re:" entries are regular expressions)
    group: int = INT4_GROUP  # int4: columns per scale and offset (-1: the whole input width)
    # int4: how the checkpoint packs it: "gguf" (our layout, repacked by the GGUF loader; "gguf_k" with float32
    # scales, for Q4_K's), "awq" (AutoAWQ GEMM),
    # "gptq" (zero points stored minus one, as AutoGPTQ writes them), "gptq_v2" (zero points as they are),
    # "ct" / "ct_asym" (compressed-tensors pack-quantized, symmetric / with zero points), "nvfp4" / "mxfp4" (FP4 E2M1)
    format: str = ""
    # GGUF: modules kept as one signed byte a weight (blocks of 5, 6 or 8 bits, or 4-bit ones fused with those), with
    # a scale per `wide_group` columns (float32 with `wide_fp32`, else float16) and, with `wide_offsets`, an offset;
    # every such layer of a file alike (loader/gguf_loader.py wide_blocks)
    wide: tuple[str, ...] = ()
    wide_group: int = 32
    wide_offsets: bool = False
    wide_fp32: bool = False
    # GGUF: modules of kinds not kept as stored (F16, Q2_K, Q3_K, ...): loaded dequantized, rounded to 4 bits at load
    rounded: tuple[str, ...] = ()

    def keeps_16bit(self, names: list[str]) -> bool:
        """Whether the layer whose checkpoint modules are `names` stays unquantized (all of them must agree)."""
        return self.method == "none" or _all_or_none(self.ignore, names, "quantization ignores")

    def rounds(self, names: list[str]) -> bool:
        """Whether the layer whose checkpoint modules are `names` is 16-bit in the checkpoint and rounded to 4 bits as
        it loads (a GGUF's projections of kinds not kept as stored)."""
        return self.method == "int4" and _all_or_none(self.rounded, names, "rounding covers")

    def keeps_8bit(self, names: list[str]) -> bool:
        """Whether the layer whose checkpoint modules are `names` holds 8-bit integers (GGUF's `wide` layers)."""
        return self.method == "int4" and _all_or_none(self.wide, names, "8-bit blocks hold")


def _all_or_none(patterns: tuple[str, ...], names: list[str], what: str) -> bool:
    hits = [any(_matches(pattern, n) for pattern in patterns) for n in names]
    if any(hits) and not all(hits):
        raise ValueError(f"{what} only some of the modules fused into one layer: {names}")
    return all(hits)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None or re.fullmatch(pattern[3:], "model." + name) is not None
    return pattern.removeprefix("model.") == name


def parse_quantization_config(qc: dict[str, Any] | None) -> QuantSpec:
    """An HF config.json's `quantization_config` -> QuantSpec (ValueError for formats slipstream does not read)."""
    if not qc:
        return QuantSpec()
    method = qc.get("quant_method")
    if method == "gguf":  # a GGUF file's 4-bit and 8-bit layers (the loader writes this entry: GGUF has no such config)
        return QuantSpec("int4", serialized=True, rounded=tuple(qc.get("modules_rounded") or ()), group=32,
                         format="gguf_k" if qc.get("k_quants") else "gguf", wide=tuple(qc.get("modules_8bit") or ()),
                         wide_group=qc.get("wide_group", 32), wide_offsets=bool(qc.get("wide_offsets")),
                         wide_fp32=bool(qc.get("wide_fp32")))
    if method in ("awq", "gptq"):
        if qc.get("bits") != 4:
            raise ValueError(f"{method} checkpoints with {qc.get('bits')} bits: only 4-bit ones are supported")
        group = int(qc.get("group_size", 128))
        ignore = tuple(qc.get("modules_to_not_convert") or ())
        if method == "awq":
            if str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True):
                raise ValueError("awq checkpoints: only the GEMM layout with zero points is supported")
            return QuantSpec("int4", serialized=True, ignore=ignore, group=group, format="awq")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq checkpoint_format {fmt!r}: supported gptq, gptq_v2")
        return QuantSpec("int4", serialized=True, ignore=ignore, group=group, format=fmt)
    if method == "fp8":  # transformers / vLLM FP8: per-tensor scales, or 128 x 128 blocks with weight_scale_inv
        block = qc.get("weight_block_size")
        act = qc.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme must be dynamic or static, got {act!r}")
        if block is not None and act != "dynamic":
            raise ValueError("block-scaled fp8 checkpoints need dynamic activation scales")
        ignore = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
        if block is not None:
            return QuantSpec("fp8", "block", tuple(block), "dynamic", True, "weight_scale_inv", ignore)
        return QuantSpec("fp8", "tensor", activations=act, serialized=True, ignore=ignore)
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config groups are not supported (one)")
        w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
        ignore = tuple(qc.get("ignore") or ())
        if w.get("type") == "int" and w.get("num_bits") == 4:  # W4A16 ("pack-quantized"), llm-compressor's GPTQ / RTN
            if a is not None or qc.get("format") != "pack-quantized":
                raise ValueError("compressed-tensors int4: only weight-only checkpoints in the pack-quantized format are supported")
            strategy = w.get("strategy")
            if strategy not in ("group", "channel") or w.get("actorder") not in (None, False, "static", "weight"):
                raise ValueError(f"compressed-tensors int4 strategy {strategy!r} (actorder {w.get('actorder')!r}): "
                                 "supported group and channel, without dynamic act-order")
            return QuantSpec("int4", serialized=True, ignore=ignore, format="ct" if w.get("symmetric", True) else "ct_asym",
                             group=int(w.get("group_size") or -1) if strategy == "group" else -1)
        fmt = qc.get("format")
        if w.get("type") == "float" and w.get("num_bits") == 4:  # NVFP4 (groups of 16, FP8 scales) / MXFP4 (32, E8M0)
            fp4 = {"nvfp4-pack-quantized": ("nvfp4", 16), "mxfp4-pack-quantized": ("mxfp4", 32)}.get(fmt)
            if fp4 is None or w.get("group_size") != fp4[1] or not w.get("symmetric", True):
                raise ValueError(f"compressed-tensors FP4 weights: supported nvfp4-pack-quantized (groups of 16) and "
                                 f"mxfp4-pack-quantized (groups of 32), symmetric; got {fmt!r}, group {w.get('group_size')}")
            # (W4A4 checkpoints also hold a global input scale, which W4A16 reads past: activations stay 16-bit)
            return QuantSpec("int4", serialized=True, ignore=ignore, group=fp4[1], format=fp4[0],
                             activations="static" if a is not None else "dynamic")
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise ValueError(f"compressed-tensors weights {w.get('type')}/{w.get('num_bits')} bits: supported float 8-bit "
                             "(FP8), int 4-bit (pack-quantized) and float 4-bit (NVFP4, MXFP4)")
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"compressed-tensors weight strategy {strategy!r}: supported tensor, channel, block")
        block = tuple(w.get("block_structure") or (128, 128))
        if a is None:  # weight-only FP8: activations are quantized per token as the step runs
            act = "dynamic"
        elif a.get("dynamic"):
            act = "dynamic"
        elif a.get("strategy") == "tensor":
            act = "static"
        else:
            raise ValueError(f"compressed-tensors static activations with strategy {a.get('strategy')!r} are not supported")
        if strategy == "block" and act != "dynamic":
            raise ValueError("block-scaled fp8 checkpoints need dynamic activation scales")
        return QuantSpec("fp8", strategy, block, act, True, "weight_scale", ignore)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported (supported: fp8, compressed-tensors "
                     f"FP8 and int4, awq, gptq)")


def resolve_quantization(option: str, checkpoint: QuantSpec) -> QuantSpec:
    """The `quantization` option against what the checkpoint holds -> what the model's layers will hold."""
    if option not in METHODS:
        raise ValueError(f"quantization must be one of: {', '.join(METHODS)}; got {option!r}")
    # A GGUF file's 4-bit layers run 4-bit when asked (`int4`); otherwise they load dequantized, as 16-bit weights
    # (or FP8 from those) until the 4-bit kernels' speed on the GPU has been measured against the 16-bit ones.
    if checkpoint.method == "int4" and checkpoint.format.startswith("gguf") and option in ("auto", "none", "fp8"):
        checkpoint = QuantSpec()
    if checkpoint.method != "none":
        if option not in ("auto", checkpoint.method):
            raise ValueError(f"the checkpoint holds {checkpoint.method} weights; quantization={option!r} cannot run it "
                             f"(use 'auto' or '{checkpoint.method}')")
        return checkpoint
    if option == "fp8":  # online: per-channel weight scales taken at load, per-token activation scales per step
        return QuantSpec("fp8", "channel", activations="dynamic", serialized=False, ignore=checkpoint.ignore)
    if option == "int4":  # online: round-to-nearest per group of INT4_GROUP columns
        return QuantSpec("int4", serialized=False, ignore=checkpoint.ignore)
    return checkpoint
