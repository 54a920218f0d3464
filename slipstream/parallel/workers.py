"""The processes of a tensor-parallel engine: rank 0 is the engine core's own process (it schedules); ranks 1..N-1
are started here and run each step rank 0 sends them.

Every rank holds a ModelRunner on its slice of the model. Rank 0's (`LeadRunner`) broadcasts each step it launches
(a plain-data `Step`, pickled over a gloo group) and, for structured output, the token masks it fills; the others
(`serve`) launch the same steps in the same order, meet rank 0 in the layers' collectives, and draw the same tokens
from the same gathered logits and seeds. Only rank 0's results are read.

Ranks find each other through torch.distributed's TCP rendezvous: MASTER_ADDR (default 127.0.0.1) and MASTER_PORT
(default: a free port), as torchrun sets them. On CUDA rank r uses GPU r and NCCL; on a CPU, gloo. A worker that
dies fails rank 0's next collective (the engine stops with an error); rank 0 gone, the workers' next receive fails
and they exit.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from slipstream.parallel.shard import Shard

log = logging.getLogger(__name__)
_TIMEOUT = datetime.timedelta(minutes=10)  # a collective no rank answers: the load of a large model fits in it


def _rendezvous() -> tuple[str, int]:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return addr, int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return addr, s.getsockname()[1]


def join(rank: int, world: int, addr: str, port: int, cuda: bool) -> Shard:
    """Join the ranks' process group (NCCL for tensors on CUDA, gloo for host values; gloo for both on a CPU)."""
    if cuda:
        # NVLink multicast (NVLS) stays off unless the user asks for it: on shared hosts a program using it can put
        # every GPU of the host out of service; NCCL's ring and tree all-reduces need no multicast.
        for var, off in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, off)
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                            world_size=world, timeout=_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=_TIMEOUT) if cuda else dist.group.WORLD
    return Shard(rank, world, dist.group.WORLD, control)


def _worker(config: Any, rank: int, world: int, addr: str, port: int, max_len: int, eos_ids: set[int]) -> None:
    from slipstream import loader
    from slipstream.runner.device import resolve_device
    from slipstream.runner.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s [rank {rank}] %(message)s")
    shard = join(rank, world, addr, port, resolve_device(config.device).type == "cuda")
    try:
        loaded = loader.load(config.model, config.load_format, config.tokenizer)
        runner = ModelRunner(config, loaded.config, loaded.weights, max_len, eos_ids, shard=shard)
        serve(runner, shard)
    finally:
        dist.destroy_process_group()


def _receive(shard: Shard) -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=shard.control)
    return box[0]


def serve(runner: Any, shard: Shard) -> None:
    """Run rank 0's steps until it says stop. A launched step is collected after the next is launched, as rank 0
    does with overlap (collecting is local: no rank waits on another for it)."""
    previous = None
    while True:
        message = _receive(shard)
        if message[0] == "stop":
            return
        _, step, masked = message
        launched = runner.launch(step, (lambda owners, before: _receive(shard)) if masked else None)
        if previous is not None:
            runner.collect(previous)
        previous = launched


class LeadRunner:
    """Rank 0's runner: each step it launches goes to the other ranks first, and so do the masks it fills."""

    def __init__(self, runner: Any, shard: Shard, workers: list[multiprocessing.Process]) -> None:
        self.runner, self.shard, self.workers = runner, shard, workers

    def _send(self, obj: Any) -> None:
        dist.broadcast_object_list([obj], src=0, group=self.shard.control)

    def launch(self, step: Any, fill_masks: Any = None) -> Any:
        self._send(("step", step, fill_masks is not None))
        if fill_masks is None:
            return self.runner.launch(step)

        def fill_and_send(owners: list[int], before: Any) -> Any:
            mask = fill_masks(owners, before)
            self._send(mask)
            return mask

        return self.runner.launch(step, fill_and_send)

    def collect(self, launched: Any) -> Any:
        return self.runner.collect(launched)

    def __getattr__(self, name: str) -> Any:  # num_blocks, device, kv, ...: the rank's own runner
        return getattr(self.runner, name)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (another engine in this process may form one)."""
        try:
            self._send(("stop",))
        finally:
            for w in self.workers:
                w.join(30)
                if w.is_alive():
                    w.kill()
            dist.destroy_process_group()


def start(config: Any, model_config: Any, weights: Any, max_len: int, eos_ids: set[int]) -> LeadRunner:
    """Start ranks 1..N-1 and build rank 0's runner here (they meet as they build: the KV page count is agreed)."""
    from slipstream.runner.device import resolve_device
    from slipstream.runner.model_runner import ModelRunner

    world = config.tensor_parallel_size
    Shard(0, world).heads(model_config.num_heads, model_config.num_kv_heads)  # a bad split is an error before any start
    cuda = resolve_device(config.device).type == "cuda"
    if cuda and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    addr, port = _rendezvous()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(config, r, world, addr, port, max_len, eos_ids), daemon=True,
                           name=f"slipstream-rank{r}") for r in range(1, world)]
    for w in workers:
        w.start()
    shard = join(0, world, addr, port, cuda)
    try:
        runner = ModelRunner(config, model_config, weights, max_len, eos_ids, shard=shard)
    except BaseException:
        for w in workers:
            w.kill()
        dist.destroy_process_group()
        raise
    log.info("tensor parallel: %d ranks", world)
    return LeadRunner(runner, shard, workers)
