"""Where the model runs and in what dtype."""
from __future__ import annotations

import logging

import torch

from slipstream.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of: auto, cpu, cuda; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability (8, 0) for an A100, (9, 0) for an H100/H200; (0, 0) for the CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def resolve_dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': fp32 on CPU; on a GPU the checkpoint's fp16, else bf16 (fp16 on GPUs older than compute capability
    8.0, which have no bf16 arithmetic: Triton's bf16 kernels do not build for them)."""
    cap = capability(device)
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if model.dtype != "float16" and cap < (8, 0):
            log.warning("this GPU (compute capability %d.%d) has no bfloat16: running the %s checkpoint in float16, "
                        "whose narrower range some models overflow", *cap, model.dtype)
        return torch.float16 if model.dtype == "float16" or cap < (8, 0) else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of: auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "bfloat16" and device.type == "cuda" and cap < (8, 0):
        raise ValueError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer (this one is "
                         f"{cap[0]}.{cap[1]}); use --dtype float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
