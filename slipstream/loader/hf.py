from __future__ import annotations

from typing import Iterator

import torch
from safetensors import safe_open


def safetensors_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
