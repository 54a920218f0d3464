"""Facts about where kernels run, shared by every kernel family."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests only, no autotuning


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get IEEE fp32 dots (Triton would otherwise use TF32) so they match the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"
