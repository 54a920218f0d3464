from __future__ import annotations

from typing import Iterator

import torch
from safetensors import safe_open

from slipstream.loader.progress import progress


def safetensors_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, one at a time (a progress bar on an interactive terminal)."""
    total = 0
    for path in files:  # headers only: the count for the bar
        with safe_open(path, framework="pt") as f:
            total += len(f.keys())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return progress(tensors(), total)
