"""CUDA graphs' contract, emulated on the CPU, so that code which captures and replays graphs runs in the CPU suite.

A real capture records kernels on fixed addresses without the host seeing any value: a replay reruns those kernels on
whatever those addresses hold then. `EmulatedGraph` records every aten op (with the tensors it met) between
`capture_begin` and `capture_end`, and `replay` reruns them in order, writing each result where the capture's result
lives. So inputs written into captured buffers flow through, and anything the host decided during the capture (a
shape, a branch, a `.tolist()`) stays frozen, as it would on the GPU. Not emulated: memory pools (the CPU allocator
never reuses a block the recording holds) and streams.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# allocations: a real graph replays nothing for them (their memory is simply there)
_NO_REPLAY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default}


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _NO_REPLAY:
            self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    def __init__(self) -> None:
        self.ops: list = []
        self._mode: _Recorder | None = None

    def capture_begin(self, pool: object = None) -> None:
        self._mode = _Recorder(self.ops)
        self._mode.__enter__()

    def capture_end(self) -> None:
        self._mode.__exit__(None, None, None)
        self._mode = None

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            res = func(*args, **kwargs)
            for fixed, new in zip(tree_flatten(out)[0], tree_flatten(res)[0]):
                if isinstance(fixed, torch.Tensor) and fixed is not new:
                    fixed.copy_(new)


def emulate_cuda_graphs(monkeypatch) -> None:  # noqa: ANN001 - pytest's monkeypatch
    """torch.cuda's graph and stream calls, as runner/cuda_graphs.py makes them, on the CPU."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
