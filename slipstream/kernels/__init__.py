"""Triton kernels: pure functions of tensors, one kernel family per file, each with a torch reference.

`enabled(x)` says whether the fused GPU path should run for a tensor; the engine switches it on when the
attention backend is `triton` and the model runs on CUDA.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests only, no autotuning
_enabled = False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get IEEE fp32 dots (Triton would otherwise use TF32) so they match the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def enable(flag: bool) -> None:
    global _enabled
    _enabled = flag


def enabled(x: torch.Tensor) -> bool:
    return _enabled and x.is_cuda


def fused_add_rms_norm(x, residual, weight, eps):  # noqa: ANN001 - thin dispatch, typed in the kernel module
    from slipstream.kernels.rmsnorm import fused_add_rms_norm as f

    return f(x, residual, weight, eps)


def silu_and_mul(x):  # noqa: ANN001
    from slipstream.kernels.activation import silu_and_mul as f

    return f(x)


def qk_norm_rope_store(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.rope import qk_norm_rope_store as f

    return f(*args, **kwargs)


def argmax(x):  # noqa: ANN001, ANN201
    from slipstream.kernels.sampling import argmax as f

    return f(x)


def gumbel_argmax(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.sampling import gumbel_argmax as f

    return f(*args, **kwargs)


def gemv(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.matvec import gemv as f

    return f(*args, **kwargs)
