"""K cut into slices whose sums meet in a fixed order: split-K without float atomics.

A projection of few rows reads its whole weight once, and its time is those bytes over the bandwidth the programs keep
busy. A narrow weight in tiles of rows is few programs (4,096 rows in tiles of 16: 256 programs, two an SM on an H100),
too few loads in flight (Nsight Compute, docs/benchmarks.md). Cutting K into slices multiplies the programs. Each
slice stores its float32 sums; the last slice of a tile to arrive (an atomic count per tile) adds every slice's sums in
slice order and finishes the tile, so the result does not depend on which slice ended first, and nothing has to be
zeroed before the kernel (a float32 output summed with atomics had to be, 3-4 us a call in a graph).

The counts live in one buffer per device for the life of the process: each tile's last slice resets its count, and
CUDA graphs keep the address. One buffer serves every launch because the engine runs them on one stream, each
waiting for the kernel before it (with PDL, a kernel touches memory only after `await_inputs`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

COUNTS = 1 << 16  # tiles a split launch may count in (a 262,144-row vocabulary in 4-row tiles needs 65,536)
_counts: dict[torch.device, torch.Tensor] = {}


def tile_counts(device: torch.device) -> torch.Tensor:
    """The split tiles' arrival counts on `device` (COUNTS of them): zeros, each reset by its tile's last slice."""
    if device.type == "cuda" and device.index is None:  # ("cuda" and "cuda:0" are different keys)
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _counts:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a kernel with K in slices must first run on a device outside CUDA graph capture (its "
                               "arrival counts are zeroed then, once): warm up before capturing")
        _counts[device] = torch.zeros(COUNTS, dtype=torch.int32, device=device)
    return _counts[device]


@triton.jit
def arrive(count_ptr, SPLIT_K: tl.constexpr):
    """After this program has stored its slice's sums: count its arrival at the tile's count; True for the tile's
    last slice, which then reads every slice's sums (`slice_sum`) and resets the count (`leave`)."""
    # every thread's stores before the count (one thread's release publishes what the barrier ordered before it)
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1


@triton.jit
def slice_sum(part_ptr, at, mask, slice_stride, like, SPLIT_K: tl.constexpr):
    """The sum, in slice order, of the SPLIT_K slices' float32 sums stored at part_ptr + s * slice_stride + at (the
    shape of `like`)."""
    total = tl.zeros_like(like)
    for s in range(SPLIT_K):
        total += tl.load(part_ptr + s * slice_stride + at, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def leave(count_ptr):
    """The tile's last slice resets its count for the next launch."""
    tl.atomic_xchg(count_ptr, 0)
