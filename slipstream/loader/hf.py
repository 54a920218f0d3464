from __future__ import annotations

from typing import Any, Iterator

import torch
from safetensors import safe_open

from slipstream.loader.progress import progress


class LazyTensor:
    """A checkpoint tensor not read yet: its shape, and reads of the part a tensor-parallel rank keeps (`narrow`)
    or of all of it (`materialize`). `read` counts the bytes read."""

    def __init__(self, part: Any, read: list[int]) -> None:
        self._part, self._read = part, read
        self.shape = tuple(part.get_shape())

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self._read[0] += t.numel() * t.element_size()
        return t

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + size),)
        return self._count(self._part[index])

    def materialize(self) -> torch.Tensor:
        return self._count(self._part[...])  # [...]: 0-dim tensors (per-tensor scales) too


def safetensors_weights(files: list[str], lazy: bool = False, read: list[int] | None = None) -> Iterator[tuple[str, Any]]:
    """Every tensor of the files, one at a time (a progress bar on an interactive terminal); `lazy`: as LazyTensors,
    each read only in the parts its loader takes (valid until the next one is drawn); `read` counts their bytes."""
    total = 0
    for path in files:  # headers only: the count for the bar
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())
    read = read if read is not None else [0]

    def tensors() -> Iterator[tuple[str, Any]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name), read) if lazy else f.get_tensor(name)

    return progress(tensors(), total)
