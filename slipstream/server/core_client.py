"""The API front end's handle on the engine core: requests out over ZeroMQ, outputs back to each request.

Tokenization and checks (InputProcessor) happen before a request is sent, so nothing a client sends can raise
inside the core. One task reads the core's per-step messages, detokenizes them (OutputProcessor) and hands each
request its RequestOutput through an asyncio queue. When the core fails or its process dies, every open request
gets EngineDeadError and `on_dead` is called (the server then exits non-zero).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import select
import tempfile
import threading
import uuid
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from slipstream.engine.input_processor import EngineOverloaded
from slipstream.engine.core_stats import CoreStats
from slipstream.engine.input_processor import InputProcessor
from slipstream.engine.messages import Abort, AddRequest, Failed, FinishSequences, FromCore, Ready, Shutdown, StepOut
from slipstream.engine.output_processor import OutputProcessor
from slipstream.engine.outputs import RequestOutput
from slipstream.sampling_params import SamplingParams

log = logging.getLogger("slipstream.server")


class EngineDeadError(RuntimeError):
    pass


def _on_a_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """`fn()`'s result, as a future of the running loop. A daemon thread, not the loop's executor, whose threads the
    interpreter joins at exit: a server whose core failed while its tokenizer loads must not wait for that load."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():  # (cancelled: nobody waits for it)
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # noqa: BLE001 - raised in the awaiting task
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the server is exiting
            pass

    threading.Thread(target=run, daemon=True, name="slipstream-tokenizer-load").start()
    return done


def _addresses(clients: int = 1) -> tuple[str, str, list[str]]:
    d = tempfile.mkdtemp(prefix="slipstream-")
    return d, f"ipc://{d}/in", [f"ipc://{d}/out{i}" for i in range(clients)]


class CoreProcess:
    """The engine core in a process of its own (spawned: CUDA must not be initialized in a forked child), for
    `clients` front ends; this process is front end 0 unless it only supervises (`slipstream serve
    --api-server-count N`: `attach(i)` is front end i's handle)."""

    client, owned = 0, True  # as front end 0; the owner stops the core when it stops

    def __init__(self, config: Any, log_level: str = "info", clients: int = 1) -> None:
        from slipstream.engine.core_process import run_core_process

        self.dir, self.in_addr, self.out_addrs = _addresses(clients)
        self.out_addr = self.out_addrs[0]
        ctx = multiprocessing.get_context("spawn")
        # A daemonic process may not start processes: a tensor-parallel core starts its ranks, so it is not one (it
        # still stops with the front end: it watches its parent, and stop() kills it if it lingers)
        self.proc = ctx.Process(target=run_core_process, args=(config, self.in_addr, self.out_addrs, os.getpid(), log_level),
                                name="slipstream-core", daemon=config.tensor_parallel_size == 1)
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def join(self, timeout: float) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def attach(self, client: int) -> "CoreAttached":
        return CoreAttached(self.in_addr, self.out_addrs[client], client, self.proc.pid)


class CoreAttached:
    """Front end `client`'s handle on a core that another process started and stops (picklable: it travels to the
    front-end process). The core's exit is noticed through a pidfd, which works for a process that is not our
    child, and turns readable when it exits, zombie or not."""

    owned = False

    def __init__(self, in_addr: str, out_addr: str, client: int, pid: int) -> None:
        self.in_addr, self.out_addr, self.client, self.pid = in_addr, out_addr, client, pid
        self._exited: select.poll | None = None
        self._gone = False

    def watch(self) -> None:
        """Start watching the core (in the front-end process, at its start)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._gone = True
        except (OSError, AttributeError):  # an old kernel, a seccomp profile without pidfds, not Linux
            return
        else:
            self._exited = select.poll()
            self._exited.register(fd, select.POLLIN)

    def alive(self) -> bool:
        if self._gone:
            return False
        if self._exited is not None:
            self._gone = bool(self._exited.poll(0))
            return not self._gone
        try:  # without a pidfd: the pid exists and is not a zombie (the supervisor reaps it only later)
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            try:
                os.kill(self.pid, 0)
                return True
            except OSError:
                return False

    def join(self, timeout: float) -> None:
        pass  # the supervising process stops the core once every front end has drained


class CoreThread:
    """An already loaded core served on a thread of this process (tests; same loop and sockets as a process)."""

    client, owned = 0, True

    def __init__(self, core: Any) -> None:
        from slipstream.engine.core_process import serve_core

        self.dir, self.in_addr, out_addrs = _addresses()
        self.out_addr = out_addrs[0]
        self.thread = threading.Thread(target=self._run, args=(serve_core, core, out_addrs), name="slipstream-core",
                                       daemon=True)
        self.thread.start()

    def _run(self, serve_core: Callable, core: Any, out_addrs: list[str]) -> None:
        try:
            serve_core(core, self.in_addr, out_addrs)
        except BaseException:  # noqa: BLE001 - logged and reported to the front end by serve_core
            pass

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


class _Stream:
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()


class AsyncEngineClient:
    def __init__(self, runner: CoreProcess | CoreAttached | CoreThread,
                 on_step: Callable[[list[RequestOutput], CoreStats, float], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        """Connects to the core at once: a core that fails while this front end loads its tokenizer is heard (it
        waits for its front ends to connect before it reports and exits)."""
        self.runner, self.tokenizer = runner, None
        self.on_step, self.on_dead = on_step, on_dead
        self.ctx = zmq.asyncio.Context()
        self._to_core = self.ctx.socket(zmq.PUSH)
        self._to_core.connect(runner.in_addr)
        self._from_core = self.ctx.socket(zmq.PULL)
        self._from_core.connect(runner.out_addr)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(FromCore).decode
        self.inputs: InputProcessor | None = None
        self.outputs: OutputProcessor | None = None
        self.stats = CoreStats()
        self._streams: dict[str, _Stream] = {}
        self._sent_seqs = 0  # sequences sent since the core last reported its queue (admission control)
        self.error: BaseException | None = None
        self.accepting = True
        self._tasks: list[asyncio.Task] = []

    # ---- life cycle ----
    async def start(self, load_tokenizer: Callable[[], Any]) -> None:
        """Load the tokenizer (`load_tokenizer()`, on a thread) while the core loads the model; once both are ready,
        serve the core's outputs in the background. Raises as soon as the core fails or its process ends, loaded or
        not: a core that dies while it starts (a tensor-parallel rank killed, out of memory) ends the server then,
        not after the tokenizer and the imports beside it (tens of seconds on a busy machine)."""
        loading = _on_a_daemon_thread(load_tokenizer)
        first = asyncio.ensure_future(self._from_core.recv())
        try:
            msg = None
            while True:
                if loading.done():
                    loading.result()  # (its error: at once, not once the model has loaded)
                if msg is None and first.done():
                    msg = self._decode(first.result())
                    if isinstance(msg, Failed):
                        raise RuntimeError(msg.message)
                if msg is not None and loading.done():
                    break
                await self._while_core_lives({f for f in (first, loading) if not f.done()})
        except BaseException:
            for f in (first, loading):
                f.cancel()
            self.ctx.destroy(linger=0)  # (a client that did not start is not used)
            raise
        self.tokenizer = loading.result()
        self.inputs = InputProcessor(self.tokenizer, msg.limits)
        self.outputs = OutputProcessor(self.tokenizer)
        self._tasks = [asyncio.ensure_future(self._read_outputs()), asyncio.ensure_future(self._watch())]

    async def _while_core_lives(self, pending: set[asyncio.Future]) -> None:
        """Until one of `pending` is done; an error as soon as the core's process has ended."""
        while not (await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED))[0]:
            if not self.runner.alive():
                raise RuntimeError("the engine core exited while loading the model")

    @property
    def limits(self):  # noqa: ANN201
        return self.inputs.limits

    @property
    def alive(self) -> bool:
        return self.error is None and self.inputs is not None

    async def stop(self, timeout: float = 10.0) -> None:
        if self.runner.owned and self.runner.alive():
            await self._to_core.send(self._encode(Shutdown()))
        for t in self._tasks:
            t.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.runner.join, timeout)
        self.ctx.destroy(linger=0)

    # ---- requests ----
    def generate(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 priority: int = 0, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Check and send now (ValueError / EngineOverloaded / EngineDeadError raise here, before any output);
        return the stream of outputs. Closing the stream before it finishes aborts the request."""
        if not self.alive:
            raise EngineDeadError(f"the engine core is not running: {self.error}")
        if not self.accepting:
            raise EngineOverloaded("server is shutting down")
        self.inputs.check(prompt_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        waiting = self.stats.waiting + self._sent_seqs
        if waiting + params.n > self.limits.max_waiting:
            raise EngineOverloaded(f"{waiting} sequences already waiting")
        s = self._streams[request_id] = _Stream()
        self._sent_seqs += params.n
        self.outputs.add(request_id, prompt, prompt_ids, params, stream)
        self._to_core.send(self._encode(AddRequest(request_id, prompt_ids, params, priority, self.runner.client)))
        return self._outputs(request_id, s)

    async def _outputs(self, request_id: str, s: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await s.queue.get()
                # A consumer that fell behind (a busy event loop, a slow client) gets one output with every delta
                # it missed: fewer, larger SSE events exactly when the front end is short of time.
                while not isinstance(item, BaseException) and not s.queue.empty():
                    nxt = s.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        s.queue.put_nowait(nxt)  # delivered after what came before it
                        break
                    item = item.then(nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)  # the client went away or the request failed: free its pages now

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        out = self.outputs.abort(request_id)
        if self.alive:
            self._to_core.send(self._encode(Abort([request_id])))
        if out is not None and self.on_step is not None:
            self.on_step([out], self.stats, 0.0)

    def fail_all(self, error: BaseException) -> None:
        """End every open request with `error` (engine death, or the end of the shutdown grace period)."""
        for rid, s in list(self._streams.items()):
            s.queue.put_nowait(error)

    # ---- the core's messages ----
    async def _read_outputs(self) -> None:
        try:
            while True:
                msg = self._decode(await self._from_core.recv())
                if isinstance(msg, Failed):
                    self._die(EngineDeadError(msg.message.splitlines()[0]))
                    return
                self._on_step(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - a front-end bug here must not leave requests hanging
            log.exception("reading the engine core's outputs failed")
            self._die(EngineDeadError(f"front end failed to read engine outputs: {e!r}"))

    def _on_step(self, msg: StepOut) -> None:
        self.stats = msg.stats
        self._sent_seqs = 0
        for r in msg.rejected:
            s = self._streams.pop(r.request_id, None)
            self.outputs.abort(r.request_id)
            if s is not None:
                s.queue.put_nowait(EngineOverloaded(r.message) if r.overloaded else ValueError(r.message))
        outputs, to_stop = self.outputs.process(msg.deltas)
        if to_stop:
            self._to_core.send(self._encode(FinishSequences(to_stop)))
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is not None:
                if out.finished:
                    del self._streams[out.request_id]
                s.queue.put_nowait(out)
        if self.on_step is not None:
            self.on_step(outputs, msg.stats, msg.step_time)

    async def _watch(self) -> None:
        """Notice a core that died without a word (SIGKILL, the OOM killer)."""
        while self.error is None:
            await asyncio.sleep(0.5)
            if not self.runner.alive():
                await asyncio.sleep(0.5)  # a Failed message may still be on its way
                if self.error is None:
                    self._die(EngineDeadError("the engine core process died"))

    def _die(self, error: EngineDeadError) -> None:
        if self.error is not None:
            return
        log.critical("%s", error)
        self.error = error
        self.fail_all(error)
        self._streams.clear()
        if self.on_dead is not None:
            self.on_dead(error)


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"
