"""Programmatic dependent launch (PDL, Hopper and later), which every slipstream Triton kernel takes part in.

A batch-1 decode step is hundreds of short dependent kernels (a Qwen3-30B-A3B step: nine a layer, most of them under
10 us), and each one's programs used to be launched only after the kernel before it had ended: a launch latency and
a ramp-up per kernel, with the SMs idle in between. Launched with PDL, a kernel's programs are placed on the SMs
while the kernel before it runs (as soon as each of that kernel's programs has called `gdc_launch_dependents`), and
block in `gdc_wait` until it has finished and its writes are visible. So every kernel launched this way
must wait before it touches global memory that another kernel writes or reads: `await_inputs` is the first
statement of each kernel, and nothing comes before it. Waiting is transitive (a kernel ends only after its own wait),
so a kernel sees the writes of every kernel before it, not only of the last. Kernels launched without PDL (torch's,
cuBLAS's) are ordered as always; CUDA graphs keep the launches' programmatic edges."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from slipstream.kernels._device import INTERPRET

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton before 3.4 has no grid dependency control: kernels launch as they did before PDL
    gdc_launch_dependents = gdc_wait = None

_OFF = {"PDL": False}
_ON = {"PDL": True, "launch_pdl": True}


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """The first statement of every kernel: with PDL, wait for the kernels before this one to finish, then let the next
    kernel's programs be placed (they wait in turn, while this one runs)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _capable(index: int) -> bool:
    # (ROCm's MI300 reports capability 9.4: no PDL there)
    return gdc_wait is not None and torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel whose tensors live where `t` does: PDL on a GPU that has it (sm90 and later), not
    under Triton's CPU interpreter (which has no grid dependency control)."""
    return _ON if not INTERPRET and t.is_cuda and _capable(t.device.index) else _OFF
