"""The engine loop on its own thread, fed from asyncio.

HTTP handlers never touch the LLMEngine directly: they put commands (add, abort) in an inbox and read their
request's outputs from an asyncio.Queue. The engine thread drains the inbox between steps, so a GPU step is
never blocked by HTTP work and the event loop is never blocked by a step. If the loop dies, every stream is
answered with the error and `/health` turns 503.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from slipstream.engine.llm_engine import EngineOverloaded, LLMEngine
from slipstream.engine.outputs import RequestOutput
from slipstream.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine, list[RequestOutput], float | None], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step  # metrics hook on the engine thread: after every step (its duration) and abort (None)
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._pending = 0  # sequences submitted but not yet seen by the engine thread (admission control)
        self._pending_lock = threading.Lock()
        self.error: BaseException | None = None
        self.accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slipstream-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    # ---- event-loop side ----
    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue now (ValueError / EngineOverloaded / EngineDeadError raise here, before any output);
        return the stream of outputs. Closing the stream before it finishes aborts the request."""
        if not self.alive:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        if not self.accepting:
            raise EngineOverloaded("server is shutting down")
        self.engine.check_request(prompt_ids, params)
        waiting = len(self.engine.scheduler.waiting) + self._pending
        if waiting + params.n > self.engine.config.scheduler.max_waiting:
            raise EngineOverloaded(f"{waiting} sequences already waiting")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending += params.n
        self._inbox.put(("add", request_id, prompt_ids, params, priority))
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))  # client went away or errored: free its pages now
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request whose output stream was never consumed."""
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    # ---- engine-thread side ----
    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, priority = cmd
            with self._pending_lock:
                self._pending -= params.n
            stream = self._streams.get(rid)
            if stream is None:
                return  # the client left before the engine saw the request
            try:
                self.engine.add_request(rid, prompt_ids, params, priority)
            except (ValueError, EngineOverloaded) as e:
                stream.put(e)
        elif cmd[0] == "abort":
            out = self.engine.abort_request(cmd[1])
            if out is not None and self.on_step is not None:
                self.on_step(self.engine, [out], None)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    self._handle(self._inbox.get(block=block, timeout=0.5 if block else None))
                    while True:
                        self._handle(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished():
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                elapsed = time.perf_counter() - start
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                if self.on_step is not None:
                    self.on_step(self.engine, outputs, elapsed)
        except BaseException as e:  # noqa: BLE001 - any failure of the loop must reach every waiting client
            self.error = e
            for stream in list(self._streams.values()):
                stream.put(EngineDeadError(f"engine loop failed: {e!r}"))
