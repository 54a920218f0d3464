"""Where the model runs and in what dtype."""
from __future__ import annotations

import torch

from slipstream.config import ModelConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of: auto, cpu, cuda; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': fp32 on CPU; on a GPU the checkpoint's fp16, else bf16."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if model.dtype == "float16" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of: auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
