"""Facts about where kernels run, shared by every kernel family."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests only, no autotuning


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 models get IEEE fp32 dots (Triton would otherwise use TF32) so they match the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_compile(callback: Callable[[str, float], None]) -> Callable[[], None]:
    """From now on, call `callback(kernel with its argument specialization, seconds)` after every Triton compile in
    this process (Triton's hooks are process-wide: only for processes and blocks slipstream owns). Returns the
    function that puts the hooks back as they were."""
    from triton import knobs

    rt = knobs.runtime
    before, after = rt.jit_cache_hook, rt.jit_post_compile_hook
    started: dict[str, float] = {}

    def pre(*, key, **_) -> None:  # noqa: ANN001, ANN003 - Triton's keyword names
        started[str(key)] = time.perf_counter()

    def post(*, key, repr, **_) -> None:  # noqa: ANN001, ANN003, A002
        callback(repr, time.perf_counter() - started.pop(str(key), time.perf_counter()))

    rt.jit_cache_hook, rt.jit_post_compile_hook = pre, post

    def restore() -> None:
        rt.jit_cache_hook, rt.jit_post_compile_hook = before, after

    return restore
