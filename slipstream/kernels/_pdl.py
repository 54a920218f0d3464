"""Programmatic dependent launch (PDL, Hopper and later), which every slipstream Triton kernel takes part in.

A batch-1 decode step is hundreds of short dependent kernels (a Qwen3-30B-A3B step: nine a layer, most of them under
10 us), and each one's programs used to be launched only after the kernel before it had ended: a launch latency and
a ramp-up per kernel, with the SMs idle in between. Launched with PDL, a kernel's programs are placed on the SMs
while the kernel before it runs (as soon as each of that kernel's programs has called `gdc_launch_dependents`), and
block in `gdc_wait` until it has finished and its writes are visible. So every kernel launched this way
must wait before it touches global memory that another kernel writes or reads: `await_inputs` is the first
statement of each kernel, and nothing comes before it but `prefetch_weights` of a layer's weights (which no kernel
writes once the model is loaded), so that a kernel placed early asks for its first weight bytes while the kernel
before it drains. Waiting is transitive (a kernel ends only after its own wait), so a kernel sees the writes of every
kernel before it, not only of the last. Kernels launched without PDL (torch's, cuBLAS's) are ordered as always; CUDA
graphs keep the launches' programmatic edges."""
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


@triton.jit
def prefetch_weights(ptr, rows, num_rows, stride, row_len, wave, COLS: tl.constexpr, PDL: tl.constexpr):
    """With PDL, before `await_inputs`, in the first `wave` programs (those placed while the kernel before drains): ask
    L2 for the 128-byte lines of the first COLS elements, at most 512 bytes, of rows `rows` of a weight at `ptr` (row
    stride `stride`, `row_len` elements a row; rows and columns past the matrix are clamped to it). Their loops then
    start on bytes already on their way instead of with the full HBM latency. A later program would only ask twice
    for bytes it loads at once: on the FP8 gate-up GEMV of the Llama-3.1-8B shape every program prefetching took 51.2
    us where none took 46.6, the first 264 46.3 (H100 with 132 SMs, scripts/gemv_ab.py, one lease)."""
    if PDL:
        EACH: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements a line
        LINES: tl.constexpr = (COLS // EACH if COLS >= EACH else 1) if COLS <= 4 * EACH else 4
        if tl.program_id(0) < wave:
            cols = tl.minimum(tl.arange(0, LINES) * EACH, row_len - 1)
            at = ptr + tl.minimum(rows, num_rows - 1).to(tl.int64)[:, None] * stride + cols[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [at], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def _capable(index: int) -> bool:
    # (ROCm's MI300 reports capability 9.4: no PDL there)
    return gdc_wait is not None and torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def first_wave(t: torch.Tensor) -> int:
    """How many programs of a GEMV on `t`'s device prefetch their first weight bytes (`prefetch_weights`): two an SM,
    about those placed before the kernel before them has ended."""
    return 2 * _sms(t.device.index) if t.is_cuda else 0


def pdl(t: torch.Tensor) -> dict:
    """The launch arguments of a kernel whose tensors live where `t` does: PDL on a GPU that has it (sm90 and later), not
    under Triton's CPU interpreter (which has no grid dependency control)."""
    return _ON if not INTERPRET and t.is_cuda and _capable(t.device.index) else _OFF
