"""The processes of a tensor-parallel engine: rank 0 is the engine core's own process (it schedules); ranks 1..N-1
are started here and run each step rank 0 sends them.

Every rank holds a ModelRunner on its slice of the model. Rank 0's (`LeadRunner`) broadcasts each step it launches
(a plain-data `Step`, pickled over a gloo group) and, for structured output, the token masks it fills; the others
(`serve`) launch the same steps in the same order, meet rank 0 in the layers' collectives, and draw the same tokens
from the same gathered logits and seeds. Only rank 0's results are read.

Ranks find each other through torch.distributed's TCP rendezvous: MASTER_ADDR (default 127.0.0.1) and MASTER_PORT
(default: a free port), as torchrun sets them. Over several hosts (`nnodes`) each host runs tensor_parallel_size /
nnodes consecutive ranks: the engine's host ranks 0.., host R (`slipstream worker --node-rank R`, `run_node`) the
R-th run; the address and port must then be given alike on every host. On CUDA a rank uses its host's GPU of its
local index, and NCCL; on a CPU, gloo. Rank 0 sends every other rank the engine's context length and stop tokens
as they join. A worker that dies fails the engine at its next step; one on the engine's host, at once even when idle
(`check_ranks`: a rank on another host is seen only at the next step), and during a step or the start that it leaves
waiting (`watch`, `_fail_fast`, where the engine says what to do). Rank 0 gone, the workers' next receive fails and
they exit. Every wait between ranks times out after `distributed_timeout_s`, the workers' wait for the next step too:
an idle rank 0 sends them an empty message every quarter of it, so an engine may stay idle for as long as it likes.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from slipstream.parallel.shard import Shard

log = logging.getLogger(__name__)


def _rendezvous(nnodes: int) -> tuple[str, int]:
    if nnodes > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise ValueError(f"nnodes={nnodes}: set MASTER_ADDR (the engine's host, as the others reach it) and "
                         "MASTER_PORT alike on every host")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return addr, int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return addr, s.getsockname()[1]


def join(rank: int, world: int, addr: str, port: int, cuda: bool, timeout_s: float, expert_parallel: bool = False,
         local_rank: int | None = None) -> Shard:
    """Join the ranks' process group (NCCL for tensors on CUDA, gloo on a CPU) and a gloo group of its own for rank
    0's messages (steps, masks, keep-alives: never interleaved with the model's collectives). `local_rank`: the rank's
    index on its host (its GPU), when the ranks span hosts."""
    if cuda:
        # NVLink multicast (NVLS) stays off unless the user asks for it: on shared hosts a program using it can put
        # every GPU of the host out of service; NCCL's ring and tree all-reduces need no multicast.
        for var, off in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(var, off)
        torch.cuda.set_device(rank if local_rank is None else local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                            world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    return Shard(rank, world, dist.group.WORLD, control, expert_parallel)


def _worker(config: Any, rank: int, addr: str, port: int) -> None:
    from slipstream import loader
    from slipstream.runner.device import resolve_device
    from slipstream.runner.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s [rank {rank}] %(message)s")
    world = config.tensor_parallel_size
    shard = join(rank, world, addr, port, resolve_device(config.device).type == "cuda", config.distributed_timeout_s,
                 config.enable_expert_parallel, rank % _per_host(config))
    try:
        max_len, eos_ids = _receive(shard)
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
        if message[0] == "wait":  # rank 0 is idle
            continue
        _, step, masked = message
        launched = runner.launch(step, (lambda owners, before: _receive(shard)) if masked else None)
        if previous is not None:
            runner.collect(previous)
        previous = launched


class LeadRunner:
    """Rank 0's runner: each step it launches goes to the other ranks first, and so do the masks it fills. While no
    step goes out, a thread sends a keep-alive every `keepalive_s`: the other ranks' wait for a step is a collective
    receive, which times out."""

    def __init__(self, runner: Any, shard: Shard, workers: list[multiprocessing.Process], keepalive_s: float) -> None:
        self.runner, self.shard, self.workers = runner, shard, workers
        self._lock = threading.Lock()  # one sender at a time: a step and its masks reach the ranks back to back
        self._last_send = time.monotonic()
        self._closing = threading.Event()
        self._in_steps = 0  # launches and collects under way (a grammar's mask fill collects inside a launch)
        self._keepalive = threading.Thread(target=self._keep_ranks_waiting, args=(keepalive_s,), daemon=True,
                                           name="slipstream-rank-keepalive")
        self._keepalive.start()

    def _send(self, obj: Any) -> None:  # the caller holds self._lock
        dist.broadcast_object_list([obj], src=0, group=self.shard.control)
        self._last_send = time.monotonic()

    def _keep_ranks_waiting(self, every: float) -> None:
        while not self._closing.wait(every):
            with self._lock:
                if self._closing.is_set() or time.monotonic() - self._last_send < every:
                    continue
                try:
                    self._send(("wait",))
                except (RuntimeError, ValueError) as e:  # a rank or the group is gone: the engine finds out at its next step
                    log.warning("tensor parallel: a keep-alive failed (%s); no more are sent", e)
                    return

    @contextlib.contextmanager
    def _in_step(self) -> Iterator[None]:
        self._in_steps += 1
        try:
            yield
        except Exception as e:
            if self._closing.is_set():  # failed already (check_ranks), or stopping
                raise
            if (blamed := _blame(self.workers, e)) is not e:
                self._closing.set()
                raise blamed from e
            raise
        finally:
            self._in_steps -= 1

    def watch(self, on_stuck: Callable[[str], None], grace_s: float = 5.0) -> None:
        """Call `on_stuck(why)` from a thread of its own if, `grace_s` after a rank on this host ended, this one is
        still in a launch or collect and has not failed the engine. On NCCL a collective whose peer is gone does not
        fail: it waits for distributed_timeout_s (with overlap, in the collect of the step before, launched when the
        rank was alive), and so would every request; the engine-core process exits instead. A rank that ends between
        steps fails the next one at once (`check_ranks`, which the engine core also calls while idle). The other local
        ranks are killed first: they would hold their GPUs in the same wait."""
        if self.workers:
            threading.Thread(target=self._watch, args=(on_stuck, grace_s), daemon=True, name="slipstream-rank-watch").start()

    def _watch(self, on_stuck: Callable[[str], None], grace_s: float) -> None:
        gone = _ended(self.workers)
        if self._closing.wait(grace_s) or not self._in_steps:
            return  # stopping, the engine failed (check_ranks, a step's error), or no step is waiting
        why = _exited(*gone)
        for other in self.workers:
            other.kill()
        on_stuck(f"{why} and a step has waited for it {grace_s:g} s: its collectives cannot complete")

    def launch(self, step: Any, fill_masks: Any = None) -> Any:
        with self._lock, self._in_step():
            # A rank that died since the last step: fail now. Its collectives would fail too, but not always at once:
            # gloo has been seen waiting on a killed peer until its timeout.
            self.check_ranks()
            self._send(("step", step, fill_masks is not None))
            if fill_masks is None:
                return self.runner.launch(step)

            def fill_and_send(owners: list[int], before: Any) -> Any:
                mask = fill_masks(owners, before)
                self._send(mask)
                return mask

            return self.runner.launch(step, fill_and_send)

    def collect(self, launched: Any) -> Any:
        with self._in_step():  # (not under the lock: a grammar's mask fill collects from inside a launch)
            return self.runner.collect(launched)

    def check_ranks(self) -> None:
        """Raise if another rank's process has ended: an idle engine would otherwise learn it only at its next
        step's collective (on NCCL, perhaps after the collective's timeout)."""
        for rank, w in enumerate(self.workers, 1):
            if not w.is_alive():
                self._closing.set()  # the engine cannot go on: no more keep-alives
                raise RuntimeError(_exited(rank, w))

    def __getattr__(self, name: str) -> Any:  # num_blocks, device, kv, ...: the rank's own runner
        return getattr(self.runner, name)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (another engine in this process may form one)."""
        self._closing.set()
        self._keepalive.join()
        try:
            self._send(("stop",))
        finally:
            for w in self.workers:
                w.join(30)
                if w.is_alive():
                    w.kill()
            dist.destroy_process_group()


def start(config: Any, model_config: Any, weights: Any, max_len: int, eos_ids: set[int],
          on_stuck: Callable[[str], None] | None = None) -> LeadRunner:
    """Start ranks 1..N-1 and build rank 0's runner here (they meet as they build: the KV page count is agreed).
    `on_stuck(why)`: called from a thread of its own if a rank on this host ends while this one waits for it, during
    the start (`_fail_fast`) or in a step (`LeadRunner.watch`); without it such a wait lasts distributed_timeout_s."""
    from slipstream.runner.device import resolve_device
    from slipstream.runner.model_runner import ModelRunner

    world = config.tensor_parallel_size
    Shard(0, world).heads(model_config.num_heads, model_config.num_kv_heads)  # a bad split is an error before any start
    cuda = resolve_device(config.device).type == "cuda"
    addr, port = _rendezvous(config.nnodes)
    workers = _start_ranks(config, range(1, _per_host(config)), addr, port, cuda)
    try:
        with _fail_fast(workers, on_stuck):
            shard = join(0, world, addr, port, cuda, config.distributed_timeout_s, config.enable_expert_parallel, 0)
            dist.broadcast_object_list([(max_len, eos_ids)], src=0, group=shard.control)  # what every rank's runner needs
            runner = ModelRunner(config, model_config, weights, max_len, eos_ids, shard=shard)
    except BaseException as e:
        blamed = _blame(workers, e, "the engine started")
        for w in workers:
            w.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        if blamed is not e:
            raise blamed from e
        raise
    log.info("tensor parallel: %d ranks", world)
    lead = LeadRunner(runner, shard, workers, config.distributed_timeout_s / 4)
    if on_stuck is not None:
        lead.watch(on_stuck)
    return lead


@contextlib.contextmanager
def _fail_fast(workers: list[multiprocessing.Process], on_stuck: Callable[[str], None] | None) -> Iterator[None]:
    """While the ranks start, call `on_stuck(why)` as soon as one of this host's ends (none ends on its own before
    the engine stops: it failed, and its traceback is on stderr), having killed the others. Rank 0 may be waiting
    for it in the rendezvous or a collective, which no error ends before distributed_timeout_s."""
    if on_stuck is None or not workers:
        yield
        return
    started, done = multiprocessing.Pipe(duplex=False)

    def watch() -> None:
        ended = multiprocessing.connection.wait([started, *(w.sentinel for w in workers)])
        if started in ended:
            return
        why = _exited(*_ended(workers, timeout=0), while_="the engine started")
        for other in workers:
            other.kill()
        on_stuck(why)

    watcher = threading.Thread(target=watch, daemon=True, name="slipstream-rank-start-watch")
    watcher.start()
    try:
        yield
    finally:
        done.send(None)
        watcher.join()
        started.close()
        done.close()


def _ended(workers: list[multiprocessing.Process], timeout: float | None = None) -> tuple[int, Any] | None:
    """The first of this host's ranks (1..) whose process has ended, and the process, reaped, waiting up to `timeout`
    s (forever: None) for one; None if none has."""
    ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout) if workers else []
    gone = next(((r, w) for r, w in enumerate(workers, 1) if w.sentinel in ended), None)
    if gone is not None:
        gone[1].join(5)  # (its sentinel closes a moment before the process can be reaped and its exit code read)
    return gone


def _exited(rank: int, w: multiprocessing.Process, while_: str = "") -> str:
    return f"tensor-parallel rank {rank} exited (code {w.exitcode})" + (f" while {while_}" if while_ else "")


def _blame(workers: list[multiprocessing.Process], error: BaseException, while_: str = "") -> BaseException:
    """What rank 0 raises for `error`: if a rank of this host was killed by a signal (the OOM killer, a crash, a
    user), that, the cause of what rank 0 met (gloo: a connection reset by its peer); otherwise `error` itself (a
    rank that raised exits with code 1, often on the same error as rank 0, and its traceback is on stderr). A
    killed rank's connections may close a moment before its process ends: it is waited for up to a second."""
    if isinstance(error, Exception) and (gone := _ended(workers, timeout=1.0)) and gone[1].exitcode < 0:
        return RuntimeError(_exited(*gone, while_))
    return error


def _per_host(config: Any) -> int:
    """Ranks on each host (one GPU each on CUDA)."""
    return config.tensor_parallel_size // config.nnodes


def _start_ranks(config: Any, ranks: range, addr: str, port: int, cuda: bool) -> list[multiprocessing.Process]:
    """This host's ranks, each in a process of its own."""
    local = _per_host(config)
    if cuda and torch.cuda.device_count() < local:
        raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} over {config.nnodes} host(s) needs {local} "
                         f"GPUs a host; this one has {torch.cuda.device_count()}")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(config, r, addr, port), daemon=True, name=f"slipstream-rank{r}")
               for r in ranks]
    for w in workers:
        w.start()
    return workers


def run_node(config: Any, node_rank: int) -> int:
    """`slipstream worker`: run host `node_rank`'s ranks of an engine whose rank 0 runs on another host, until that
    engine stops. Returns the exit status: non-zero if a rank failed."""
    from slipstream.runner.device import resolve_device

    if not 0 < node_rank < config.nnodes:
        raise ValueError(f"node_rank must be in [1, nnodes={config.nnodes}): host 0 runs the engine, got {node_rank}")
    addr, port = _rendezvous(config.nnodes)
    local = _per_host(config)
    workers = _start_ranks(config, range(node_rank * local, (node_rank + 1) * local), addr, port,
                           resolve_device(config.device).type == "cuda")
    for w in workers:
        w.join()
    return max((abs(w.exitcode or 0) for w in workers), default=0)
