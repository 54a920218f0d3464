"""`slipstream quantize`: write an FP8 or a 4-bit checkpoint in the formats other readers know, from a 16-bit model.

4-bit: AutoAWQ's GEMM layout or AutoGPTQ's, round-to-nearest per group with integer zero points (write_int4_checkpoint);
or FP4 E2M1 values in compressed-tensors' NVFP4 / MXFP4 layouts, each weight rounded to the nearest of the 15 values
its group's scale makes (write_fp4_checkpoint).

Schemes (all FP8 E4M3 weights; norms, embeddings and the output projection stay in the source dtype):
  - "block":   HF fine-grained FP8, as DeepSeek-V3 and Qwen3-FP8 ship: `weight_scale_inv` per 128 x 128 block,
               dynamic activation scales (per token and 128-column group);
  - "channel": compressed-tensors `float-quantized`, as llm-compressor writes: `weight_scale` [N, 1] per output
               channel, activations dynamic per token or static per tensor;
  - "tensor":  HF FP8 per tensor: scalar `weight_scale`, activations dynamic or static (`input_scale`).
Static activation scales come from a calibration pass: the 16-bit model runs over the given texts and each
linear layer keeps the largest |input| it saw; scale = that / 448. Weights round to the nearest code of their scale,
or by GPTQ onto the same scales (`algorithm="gptq"`, its own calibration pass for the inputs' second moments).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator

import torch

from slipstream.layers.quantization.fp8 import FP8, FP8_MAX, quantize_weight_blocks, quantize_weight_per_channel
from slipstream.layers.quantization.int4 import AWQ_NIBBLE, pack, pack_int32, quantize_zero_point, zero_point_grid
from slipstream.loader import load
from slipstream.models import model_class

log = logging.getLogger(__name__)

SCHEMES = ("block", "channel", "tensor")
INT4_FORMATS = ("awq", "gptq")
FP4_FORMATS = {"nvfp4": 16, "mxfp4": 32}  # -> weights per scale
_E2M1_MAX = 6.0
# midpoints between the E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6: a magnitude rounds to the code of its interval
_E2M1_EDGES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_SHARD_BYTES = 4 << 30


def quantization_config(scheme: str, activations: str) -> dict[str, Any]:
    if scheme == "block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head"]}
    if scheme == "tensor":
        return {"quant_method": "fp8", "activation_scheme": activations, "modules_to_not_convert": ["lm_head"]}
    act = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
           if activations == "dynamic" else
           {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False})
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": act,
                                          "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                      "strategy": "channel", "dynamic": False}}}}


def calibrate(model: str | None, texts: Iterable[str], max_tokens: int, stat: str = "amax",
              **engine: Any) -> dict[str, Any]:
    """A statistic of every quantizable linear layer's input (by checkpoint module name) over the texts, run through
    the model in 16 bits: "amax", the largest |input| (static FP8 scales); "hessian", X^T X / rows in float64 over
    the input rows X (GPTQ)."""
    from slipstream import LLM, SamplingParams
    from slipstream.layers.linear import Linear

    llm = LLM(model, quantization="none", enable_prefix_caching=False, **engine)
    net = llm.engine.runner.model
    acc: dict[str, Any] = {}

    def watch(prefix: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if stat == "amax":
                m = x.abs().amax().float()
                acc[prefix] = torch.maximum(acc[prefix], m) if prefix in acc else m
            else:
                x = x.reshape(-1, x.shape[-1]).double()
                h, rows = acc.get(prefix, (0.0, 0))
                acc[prefix] = (h + x.T @ x, rows + x.shape[0])
        return hook

    handles = [m.register_forward_pre_hook(watch(name)) for name, m in net.named_modules()
               if isinstance(m, Linear) and name != "lm_head"]
    # windows of up to 1,024 tokens: enough context for realistic activations, and cheap where attention is not
    budget, limit = max_tokens, min(llm.engine.max_model_len - 1, 1024)
    log.info("calibrating on %d tokens of text (%s)", max_tokens, "input maxima" if stat == "amax" else "input Hessians")
    try:
        for text in texts:
            ids = llm.engine.tokenizer.encode(text)
            for start in range(0, len(ids), limit):
                chunk = ids[start : start + min(limit, budget)]
                if len(chunk) < 2:
                    break
                llm.generate([chunk], SamplingParams(max_tokens=1, temperature=0))  # the prefill sees every row
                budget -= len(chunk)
                if budget <= 0:
                    break
            if budget <= 0:
                break
    finally:
        for h in handles:
            h.remove()
    cls = type(net)
    value = (lambda v: v.item()) if stat == "amax" else (lambda v: v[0].cpu() / v[1])
    return {f"model.{name}": value(v) for prefix, v in acc.items() for name in cls.checkpoint_modules(prefix)}


def write_fp8_checkpoint(model: str | None, out: str, scheme: str = "block", activations: str = "dynamic",
                         calibration: Iterable[str] | None = None, calibration_tokens: int = 8192,
                         algorithm: str = "rtn", act_order: bool = False, **engine: Any) -> dict[str, Any]:
    """Quantize `model` (HF dir, .gguf, or the embedded default) into `out`; returns the written config. The scales
    come from the 16-bit weights either way; `algorithm` picks how weights round onto them: to nearest ("rtn"), or
    by GPTQ ("gptq": each column's rounding error pushed onto the columns not yet rounded, weighted by the inputs'
    second moments on the calibration text; `act_order`: columns of largest input energy first)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of: {', '.join(SCHEMES)}; got {scheme!r}")
    if activations not in ("dynamic", "static"):
        raise ValueError(f"activations must be dynamic or static, got {activations!r}")
    if algorithm not in ("rtn", "gptq"):
        raise ValueError(f"algorithm must be rtn or gptq, got {algorithm!r}")
    if act_order and algorithm != "gptq":
        raise ValueError("act_order is GPTQ's: it needs algorithm gptq")
    if scheme == "block" and activations != "dynamic":
        raise ValueError("block-scaled FP8 takes dynamic activation scales")
    loaded, quantizable = _source(model)
    input_amax, hessians = {}, {}
    if (activations == "static" or algorithm == "gptq") and loaded.config.moe is not None:
        raise ValueError("calibration measures the inputs of linear layers, and a MoE model's experts are not such "
                         "layers: use dynamic activations and --algorithm rtn")
    if (activations == "static" or algorithm == "gptq") and calibration is None:
        raise ValueError("static activation scales and GPTQ need calibration text")
    calibration = None if calibration is None else list(calibration)  # (read by up to two passes)
    if activations == "static":
        input_amax = calibrate(model, calibration, calibration_tokens, **engine)
    if algorithm == "gptq":
        hessians = calibrate(model, calibration, calibration_tokens, stat="hessian", **engine)
    writer = _ShardWriter(out)
    for name, module, tensor in _projections(loaded, quantizable, writer):
        n, k = tensor.shape
        if scheme == "block":
            if n % 128 or k % 128:
                raise ValueError(f"{name} {tuple(tensor.shape)}: the block scheme needs both sides multiples of 128 "
                                 f"(use --scheme channel)")
            q, s = quantize_weight_blocks(tensor, (128, 128))
        elif scheme == "channel":
            q, s = quantize_weight_per_channel(tensor)
            s = s[:, None]
        else:
            s = tensor.float().abs().amax().clamp(min=1e-12) / FP8_MAX
            q = (tensor.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if algorithm == "gptq":  # each weight's scale, whatever the layout
            each = s.repeat_interleave(128, 0).repeat_interleave(128, 1) if scheme == "block" else s.expand(n, k)
            q = gptq_fp8(tensor, _calibrated(hessians, module), each, act_order=act_order)
        writer.add(name, q)
        if scheme == "block":
            writer.add(f"{module}.weight_scale_inv", s)
            continue
        writer.add(f"{module}.weight_scale", s)
        if activations == "static":
            writer.add(f"{module}.input_scale", torch.tensor(max(_calibrated(input_amax, module), 1e-12) / FP8_MAX))
    return _finish(loaded, out, writer, quantization_config(scheme, activations))


def write_int4_checkpoint(model: str | None, out: str, fmt: str = "awq", group: int | None = None, algorithm: str = "rtn",
                          calibration: Iterable[str] | None = None, calibration_tokens: int = 8192,
                          act_order: bool = False, **engine: Any) -> dict[str, Any]:
    """Quantize `model` to 4 bits in AutoAWQ's GEMM layout or AutoGPTQ's (zero points stored minus one): per group
    of `group` input columns a scale and an integer zero point, w = (q - zero) * scale, the values chosen by
    round-to-nearest ("rtn") or by GPTQ ("gptq": each column's rounding error pushed onto the columns not yet
    rounded, weighted by the inputs' second moments measured on calibration text). `group` None: 128, or the largest
    of 64 and 32 that divides every projection's input width. Returns the written config."""
    if fmt not in INT4_FORMATS:
        raise ValueError(f"format must be one of: {', '.join(INT4_FORMATS)}; got {fmt!r}")
    if algorithm not in ("rtn", "gptq"):
        raise ValueError(f"algorithm must be rtn or gptq, got {algorithm!r}")
    if act_order and (algorithm != "gptq" or fmt != "gptq"):
        raise ValueError("act_order is GPTQ's: it needs algorithm gptq and format gptq (AWQ has no g_idx)")
    loaded, quantizable = _source(model)
    hessians = {}
    if algorithm == "gptq" and loaded.config.moe is not None:
        raise ValueError("GPTQ's calibration measures the inputs of linear layers, and a MoE model's experts are not "
                         "such layers: use --algorithm rtn")
    if algorithm == "gptq":
        if calibration is None:
            raise ValueError("gptq needs calibration text")
        hessians = calibrate(model, calibration, calibration_tokens, stat="hessian", **engine)
    if group is None:
        c = loaded.config
        widths = {c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size, *([c.moe.intermediate_size] if c.moe else [])}
        group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 128)
        log.info("groups of %d input columns", group)
    writer = _ShardWriter(out)
    if algorithm == "gptq":
        log.info("GPTQ over %d projections", len(hessians))
    for i, (name, module, tensor) in enumerate(_projections(loaded, quantizable, writer)):
        if algorithm == "gptq" and i and i % 25 == 0:  # (seconds a layer on a CPU: say it is moving)
            log.info("GPTQ: %d projections done", i)
        n, k = tensor.shape
        if k % group or n % 8:
            raise ValueError(f"{name} {tuple(tensor.shape)}: {fmt} needs input widths that are multiples of the group "
                             f"({group}; try --group-size 64 or 32) and output widths that are multiples of 8")
        min_zero = 1 if fmt == "gptq" else 0
        if algorithm == "gptq":
            q, zeros, scales, g_idx = gptq(tensor, _calibrated(hessians, module), group, min_zero, act_order=act_order)
        else:
            q, zeros, scales = quantize_zero_point(tensor, group, min_zero)
            g_idx = (torch.arange(k) // group).to(torch.int32)
        if fmt == "awq":
            writer.add(f"{module}.qweight", pack_int32(q.t(), 1, AWQ_NIBBLE))
            writer.add(f"{module}.qzeros", pack_int32(zeros.t(), 1, AWQ_NIBBLE))
        else:
            writer.add(f"{module}.qweight", pack_int32(q.t(), 0))
            writer.add(f"{module}.qzeros", pack_int32(zeros.t() - 1, 1))
            writer.add(f"{module}.g_idx", g_idx)
        writer.add(f"{module}.scales", scales.t())
    qc = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": ["lm_head"]} if fmt == "awq" else
          {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
           "checkpoint_format": "gptq"})
    return _finish(loaded, out, writer, qc)


def gptq(w: torch.Tensor, hessian: torch.Tensor, group: int, min_zero: int = 0, block: int = 128,
         damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ onto the 4-bit grid (see `_error_feedback`). A group's scale and zero point come from its (already
    corrected) weights when its first column is reached; with `act_order` groups form in the rounding order.
    Returns (q, zeros, scales) as `quantize_zero_point` does, q in the original column order, and g_idx: the group
    of each original column."""
    n, k = w.shape
    order = _order(hessian, act_order)
    q = torch.zeros(n, k, dtype=torch.int32)
    zeros = torch.zeros(n, k // group, dtype=torch.int32)
    scales = torch.zeros(n, k // group, dtype=torch.float16)
    grid: list[torch.Tensor] = []  # the current group's (zero points, scales) in float64

    def round_column(col: int, rest: torch.Tensor) -> torch.Tensor:
        if col % group == 0:
            z, s = zero_point_grid(rest[:, :group].float(), min_zero)
            zeros[:, col // group], scales[:, col // group] = z, s
            grid[:] = [z.double(), s.double()]
        zf, sf = grid
        qi = (rest[:, 0] / sf + zf).round().clamp(0, 15)
        q[:, col] = qi.to(torch.int32)
        return (qi - zf) * sf

    _error_feedback(w, hessian, order, round_column, max(group, block // group * group), damp)  # blocks: whole groups
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = torch.arange(k, dtype=torch.int32) // group
    return torch.empty_like(q).index_copy_(1, order, q), zeros, scales, g_idx


def gptq_fp8(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, block: int = 128, damp: float = 0.01,
             act_order: bool = False) -> torch.Tensor:
    """GPTQ onto the FP8 E4M3 grid (see `_error_feedback`) with scales fixed beforehand from the original weights
    (`scale`: float32 [N, K], each weight's, whatever the scheme's layout). A corrected weight past the grid's end
    saturates at ±448 and its error moves on like any other. Returns q FP8 [N, K] in the original column order."""
    order = _order(hessian, act_order)
    scale = scale.double()[:, order]
    q = torch.empty(w.shape, dtype=FP8)

    def round_column(col: int, rest: torch.Tensor) -> torch.Tensor:
        qi = (rest[:, 0] / scale[:, col]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        q[:, col] = qi
        return qi.double() * scale[:, col]

    _error_feedback(w, hessian, order, round_column, block, damp)
    codes = q.view(torch.uint8)  # (index_copy has no FP8 kernel on the CPU)
    return torch.empty_like(codes).index_copy_(1, order, codes).view(FP8)


def _order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The rounding order: by decreasing input energy (diag H) with `act_order`, so the columns that matter most
    are rounded first, while the most columns remain to take their error; else as stored."""
    k = hessian.shape[0]
    return torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(k)


def _error_feedback(w: torch.Tensor, hessian: torch.Tensor, order: torch.Tensor,
                    round_column: Callable[[int, torch.Tensor], torch.Tensor], block: int, damp: float) -> None:
    """GPTQ's loop (Frantar et al., 2022) for W [N, K] and H = E[x x^T] [K, K] of its inputs: columns are rounded
    in `order`; each one's error, divided by the matching diagonal entry of the inverse Hessian's Cholesky factor,
    is subtracted from the columns after it along that factor's row, so the layer's output on the calibration
    inputs moves as little as possible. `round_column(col, rest)` gets the position in `order` and the corrected
    weights from that column to the end of its block (float64 [N, ...]), records its codes, and returns the
    column's rounded values."""
    n, k = w.shape
    w = w.double()[:, order].clone()
    h = hessian.double()[order][:, order].clone()
    dead = torch.diagonal(h) == 0  # inputs that never fired: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=w.dtype)
        for i in range(b1 - b0):
            col = b0 + i
            e = (wb[:, i] - round_column(col, wb[:, i:])) / u[col, col]
            wb[:, i:] -= e[:, None] * u[col, col:b1][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (|x| <= 6): the 4-bit codes, sign in bit 3."""
    mag = torch.bucketize(x.abs().clamp(max=_E2M1_MAX), _E2M1_EDGES.to(x.device))
    return mag + 8 * (x < 0)


def fp4_quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One projection's [N, K] weight -> (E2M1 codes [N, K], its scale tensors as the format names them).
    NVFP4: a float32 global scale for the tensor, 448 * 6 / amax, so that every group's scale amax_g / 6 fits FP8
    E4M3 once multiplied by it; w = e2m1 * fp8_scale / global. MXFP4: a power of two per group of 32, the group's
    largest exponent minus E2M1's (2), stored as E8M0 (exponent + 127); w = e2m1 * 2^(e - 127)."""
    n, k = w.shape
    group = FP4_FORMATS[fmt]
    w = w.float()
    amax = w.abs().view(n, k // group, group).amax(dim=-1)
    if fmt == "nvfp4":
        glob = torch.tensor([FP8_MAX * _E2M1_MAX / max(float(w.abs().max()), 1e-12)])
        fp8 = (amax / _E2M1_MAX * glob).to(torch.float8_e4m3fn)
        scale = fp8.float() / glob
        extra = {"weight_scale": fp8, "weight_global_scale": glob}
    else:
        e = (torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2).clamp(-127, 127)
        scale = torch.exp2(e)
        extra = {"weight_scale": (e + 127).to(torch.uint8)}
    per_col = scale.repeat_interleave(group, dim=1)
    q = torch.where(per_col > 0, w / per_col.clamp(min=1e-30), torch.zeros_like(w))
    return e2m1_codes(q), extra


def write_fp4_checkpoint(model: str | None, out: str, fmt: str = "nvfp4") -> dict[str, Any]:
    """Quantize `model`'s projections to FP4 in compressed-tensors' `nvfp4-pack-quantized` (groups of 16, FP8 scales
    and a global scale per tensor) or `mxfp4-pack-quantized` (groups of 32, power-of-two scales) layout, weight-only
    (activations stay 16-bit: W4A16, which is how Hopper runs FP4). Returns the written config."""
    if fmt not in FP4_FORMATS:
        raise ValueError(f"format must be one of: {', '.join(FP4_FORMATS)}; got {fmt!r}")
    loaded, quantizable = _source(model)
    group = FP4_FORMATS[fmt]
    writer = _ShardWriter(out)
    for name, module, tensor in _projections(loaded, quantizable, writer):
        if tensor.shape[1] % group:
            raise ValueError(f"{name} {tuple(tensor.shape)}: {fmt} needs input widths that are multiples of {group}")
        codes, scales = fp4_quantize(tensor, fmt)
        writer.add(f"{module}.weight_packed", pack(codes))
        for kind, t in scales.items():
            writer.add(f"{module}.{kind}", t)
    qc = {"quant_method": "compressed-tensors", "format": f"{fmt}-pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
              "num_bits": 4, "type": "float", "symmetric": True, "group_size": group,
              "strategy": "tensor_group" if fmt == "nvfp4" else "group"}}}}
    return _finish(loaded, out, writer, qc)


def _projections(loaded: Any, quantizable: tuple[str, ...], writer: "_ShardWriter") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, module, tensor) of each quantizable projection's weight; every other tensor goes to `writer` as is."""
    for name, tensor in loaded.weights(False):
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rpartition(".")[2] in quantizable:
            yield name, module, tensor
        else:
            writer.add(name, tensor)


def _calibrated(stats: dict[str, Any], module: str) -> Any:
    """A module's calibration statistic (keys carry the `model.` prefix)."""
    key = module if module.startswith("model.") else f"model.{module}"
    if key not in stats:
        raise ValueError(f"calibration saw no input for {module}")
    return stats[key]


def _source(model: str | None) -> tuple[Any, tuple[str, ...]]:
    """The 16-bit model to quantize and the names of its quantizable projections."""
    loaded = load(model)
    if loaded.weights is None:
        raise ValueError(f"{loaded.path} has no weights to quantize")
    q = loaded.config.quantization
    if q.method != "none" and not q.format.startswith("gguf"):  # (a GGUF's blocks load dequantized here)
        raise ValueError(f"{loaded.path} is already quantized ({q.method})")
    return loaded, model_class(loaded.config.architecture).quantizable


def _finish(loaded: Any, out: str, writer: "_ShardWriter", qc: dict[str, Any]) -> dict[str, Any]:
    writer.close()
    config = dict(loaded.hf_config)
    config.pop("quantization_config", None)
    config["quantization_config"] = qc
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    loaded.tokenizer.save_pretrained(out)
    return config


class _ShardWriter:
    """safetensors files of about 4 GiB, with the HF index file when there is more than one."""

    def __init__(self, out: str) -> None:  # (the directory is made when the first shard is written, not before)
        self.out, self.files, self.pending, self.bytes = out, [], {}, 0
        self.index: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.index[name] = len(self.files)
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bytes >= _SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            os.makedirs(self.out, exist_ok=True)
            path = os.path.join(self.out, f"part-{len(self.files)}.safetensors")
            save_file(self.pending, path, metadata={"format": "pt"})
            self.files.append(path)
            self.pending, self.bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self.files, names):
            os.replace(path, os.path.join(self.out, name))
            os.chmod(os.path.join(self.out, name), 0o644)  # (safetensors writes its files private)
        if n > 1:
            with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": {k: names[i] for k, i in self.index.items()}}, f, indent=1)
