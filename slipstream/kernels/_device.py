"""Facts about where kernels run, shared by every kernel family."""
from __future__ import annotations

import os
from typing import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests only, no autotuning
GEMV_ROWS = 16  # the most rows kernels/matvec.py's GEMV takes (past them, a GEMM)
# The most rows the layers send to the GEMV. One until `slipstream bench kernels --gemv-rows 1 2 4 8 16` has measured
# on a GPU where the multi-row form beats cuBLAS (a crossover is measured, not guessed): then that row count.
LAYER_GEMV_ROWS = 1
# The most rows a 4-bit (or GGUF 8-bit) layer multiplies with the W4A16 GEMM, dequantizing its weight tile by tile
# once per BLOCK_M rows; a larger step dequantizes the whole weight once and runs cuBLAS on it. Measured on an H100
# (`slipstream bench kernels --int4-rows`, docs/benchmarks.md "4-bit weights on the GPU"): over the 8B model's four
# projections the GEMM took 281 us at 64 rows against 383 us dequantized, 616 against 424 at 256 rows.
W4A16_GEMM_ROWS = 64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers. (`triton.cdiv` and `triton.next_power_of_2` take ~1.5 us a call on the host,
    as constexpr functions: a few per layer added up in the attention launched eagerly in every layer of a mixed step.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), of a host integer."""
    return 1 << max(0, n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get IEEE fp32 dots (Triton would otherwise use TF32) so they match the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_compile(callback: Callable[[str, float], None]) -> Callable[[], None]:
    """From now on, call `callback(kernel with its compile-time constants and argument types, seconds)` whenever Triton compiles a
    kernel variant in this process, or loads one from its disk cache (a first use all the same: seconds is then the
    load's). Triton's listener is process-wide: only for processes and blocks slipstream owns. Returns the function
    that puts the listener back as it was.

    Triton's JIT hooks (`jit_cache_hook`, `jit_post_compile_hook`) are not used: while one is set, Triton serializes
    every launch's constants to JSON before compiling, and a Gluon kernel's layouts are not serializable, so the
    first Gluon compile after warm-up raised inside the launch and killed the H200 server's engine. The listener
    sees the compiler's source object instead, and nothing it does may raise into a launch."""
    from triton import knobs

    comp = knobs.compilation
    if not hasattr(comp, "listener"):
        raise RuntimeError("this Triton has no compilation listener")
    before = comp.listener

    def listener(*, src, times, cache_hit, **_) -> None:  # noqa: ANN001, ANN003 - Triton's keyword names
        try:
            names = getattr(getattr(src, "fn", None), "arg_names", ())
            consts = ", ".join(f"{names[k[0]] if len(k) == 1 and k[0] < len(names) else k}={' '.join(str(v).split())}"
                               for k, v in sorted(getattr(src, "constants", {}).items()))
            # A variant is also chosen by its arguments' types and by which of them are multiples of 16 (pointers'
            # addresses included): the arguments' part of the key, marked "/16"
            aligned = {names[k[0]] for k, v in getattr(src, "attrs", {}).items()
                       if len(k) == 1 and k[0] < len(names) and "tt.divisibility" in str(v)}
            args = ", ".join(f"{n}:{t}{'/16' if n in aligned else ''}" for n, t in getattr(src, "signature", {}).items()
                             if t != "constexpr")
            seconds = getattr(times, "total", 0) / 1e6  # microseconds
            callback(f"{getattr(src, 'name', src)}({consts}; {args}){' from the disk cache' if cache_hit else ''}",
                     seconds)
        except Exception:  # noqa: BLE001 - a diagnostic never fails a launch
            pass

    comp.listener = listener

    def restore() -> None:
        comp.listener = before

    return restore
