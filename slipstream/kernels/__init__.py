"""Triton kernels: pure functions of tensors, one kernel family per file, each with a torch reference.

Nothing here decides whether a kernel runs: the model runner builds the model with `fused=True` when the
attention backend is `triton` on a CUDA device, and the layers built that way call these. The wrappers below
import a family on first use, so a CPU-only run never compiles (or imports) a Triton kernel.
"""
from __future__ import annotations

# the layers' questions (may so many rows run the GEMV? the W4A16 GEMM?) and the GEMV's limit
from slipstream.kernels._device import GEMV_ROWS, LAYER_GEMV_ROWS, W4A16_GEMM_ROWS  # noqa: F401


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


def quantize_fp8(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.fp8 import quantize_fp8 as f

    return f(*args, **kwargs)


def fp8_gemm(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.fp8 import fp8_gemm as f

    return f(*args, **kwargs)


def fused_moe(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.moe import fused_moe as f

    return f(*args, **kwargs)


def moe_tiles(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.moe import layer_tiles as f

    return f(*args, **kwargs)


def moe_route(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.moe import route as f

    return f(*args, **kwargs)


def w4a16_gemm(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.int4 import w4a16_gemm as f

    return f(*args, **kwargs)


def dequantize_4bit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from slipstream.kernels.int4 import dequantize as f

    return f(*args, **kwargs)
