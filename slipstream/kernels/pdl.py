"""Programmatic dependent launch (Hopper and later).

A decode step is ~200 kernels of a few µs each, and every boundary costs the launch of the next grid plus the
drain of the last. A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it in the
stream is still finishing; it must not touch activations until `griddepcontrol.wait` returns, which is when the
previous grid has completed and its writes are visible. Every slipstream kernel on the decode path calls
`wait_for_previous` first (anything that reads only weights, such as an L2 prefetch, may run before it), and
signals at once that the next kernel may launch. CUDA graphs capture these launches as programmatic edges.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slipstream.kernels import INTERPRET

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: launches stay fully serialized
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def enabled() -> bool:
    return (not INTERPRET and gdc_wait is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
