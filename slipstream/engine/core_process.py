"""The engine core as a busy loop behind ZeroMQ sockets: requests in, one message per step out to each front end.

`slipstream serve` runs it in a process of its own (`run_core_process`), so that the GPU loop never waits for
the HTTP event loop, JSON, detokenization or the GIL they hold; with `--api-server-count N` it serves N front-end
processes, each sent the steps' tokens of its own requests. Tests that already hold a loaded engine run the same
loop on a thread (`serve_core`). A failure is never silent: the loop sends `Failed` with the traceback, logs it,
and the process exits non-zero.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

import msgspec
import zmq

from slipstream.engine.core import EngineCore, EngineOverloaded
from slipstream.engine.messages import (
    Abort, AddRequest, Failed, FinishSequences, Ready, Rejected, Shutdown, StepOut, ToCore,
)
from slipstream.heap import freeze_startup_heap, thaw_startup_heap

log = logging.getLogger("slipstream.core")
_IDLE_POLL_MS = 500  # an idle core wakes this often to notice that its front end has gone


class _Outboxes:
    """The sockets to the front ends, one each (`--api-server-count`): a front end gets the core's state with every
    step and the deltas and rejections of the requests it sent, nothing else."""

    def __init__(self, ctx: zmq.Context, addrs: list[str], encode) -> None:  # noqa: ANN001
        self.socks = []
        for addr in addrs:
            sock = ctx.socket(zmq.PUSH)
            # Unbounded queue: a front end that falls behind catches up; the send never blocks the loop on it. A
            # front end that has gone has no pipe: its messages are dropped (zmq.Again) and its requests aborted.
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.bind(addr)
            self.socks.append(sock)
        self.encode = encode
        self.owner: dict[str, int] = {}  # request id -> front end, while the core holds the request
        self.gone: set[int] = set()

    def send_all(self, msg, wait_s: float | None = None) -> None:  # noqa: ANN001
        """To every front end, each waited for up to `wait_s` seconds (None: until it connects). A front end that has
        gone, or has not come in time, must not hold a failing core: it notices the core's exit instead."""
        data = self.encode(msg)
        for sock in self.socks:
            if sock.poll(-1 if wait_s is None else int(wait_s * 1000), zmq.POLLOUT):
                sock.send(data, zmq.NOBLOCK)

    def step(self, core: EngineCore, deltas: list, rejected: list[tuple[int, Rejected]], step_time: float) -> None:
        snapshot = core.snapshot()
        mine: list[list] = [[] for _ in self.socks]
        ended = set()
        for d in deltas:
            client = self.owner.get(d.request_id)
            if client is None:  # aborted by its front end while the step ran: nobody waits for it
                continue
            mine[client].append(d)
            if d.finish_reason is not None:
                ended.add(d.request_id)
        for rid in ended:  # after routing: a request's samples may all end in one step
            if rid not in core.requests:
                del self.owner[rid]
        refused: list[list[Rejected]] = [[] for _ in self.socks]
        for client, r in rejected:
            refused[client].append(r)
        for i in range(len(self.socks)):
            # the one core step's time is observed once, not once per front end
            self._send(core, i, StepOut(mine[i], snapshot, step_time if i == 0 else 0.0, refused[i]))

    def _send(self, core: EngineCore, client: int, msg: StepOut) -> None:
        if client in self.gone:
            return
        try:
            self.socks[client].send(self.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # its process is gone (the server is ending): nobody is left to read its requests
            log.error("front end %d is gone: its requests are aborted", client)
            self.gone.add(client)
            for rid in [rid for rid, c in self.owner.items() if c == client]:
                core.abort_request(rid)
                del self.owner[rid]

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=2000)  # let the last message (Failed, or the final step) reach the front end


def serve_core(core: EngineCore, in_addr: str, out_addrs: list[str], ctx: zmq.Context | None = None,
               parent_pid: int | None = None) -> None:
    """Run `core` until a Shutdown message (or the death of process `parent_pid`), for one front end per address in
    `out_addrs`. Raises what the core raises, after telling the front ends."""
    if not core.serving.acquire(blocking=False):  # two loops stepping one core would steal each other's tokens
        raise RuntimeError("this engine core is already served by another loop")
    ctx = ctx or zmq.Context.instance()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(in_addr)
    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(ToCore).decode
    outboxes = _Outboxes(ctx, out_addrs, encode)
    try:
        outboxes.send_all(Ready(core.limits))
        _loop(core, inbox, outboxes, decode, parent_pid)
    except BaseException as e:
        text = "".join(traceback.format_exception(e))
        log.critical("engine core failed:\n%s", text)
        outboxes.send_all(Failed(f"engine core failed: {e!r}\n{text}"), wait_s=2.0)
        raise
    finally:
        inbox.close(linger=0)
        outboxes.close()
        core.serving.release()


def _loop(core: EngineCore, inbox: zmq.Socket, outboxes: _Outboxes, decode, parent_pid: int | None) -> None:  # noqa: ANN001
    owner = outboxes.owner
    while True:
        rejected: list[tuple[int, Rejected]] = []
        freed = False  # an abort or stop changed the gauges: report them even if no step runs
        timeout = 0 if core.has_unfinished() else _IDLE_POLL_MS
        while inbox.poll(timeout):
            timeout = 0
            msg = decode(inbox.recv())
            if isinstance(msg, AddRequest):
                try:
                    core.add_request(msg.request_id, msg.prompt_ids, msg.params, msg.priority)
                    owner[msg.request_id] = msg.client
                except (ValueError, EngineOverloaded) as e:
                    rejected.append((msg.client, Rejected(msg.request_id, str(e), isinstance(e, EngineOverloaded))))
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    freed |= core.abort_request(rid)
                    owner.pop(rid, None)
            elif isinstance(msg, FinishSequences):
                for rid, index in msg.seqs:
                    core.finish_sequence(rid, index)
                    if rid not in core.requests:
                        owner.pop(rid, None)
                freed = True
            elif isinstance(msg, Shutdown):
                return
        if parent_pid is not None and os.getppid() != parent_pid:
            log.error("the server process is gone; the engine core stops")
            return
        core.check_ranks()  # a dead rank fails the engine now, idle or not, not at the next request
        if core.has_unfinished():
            start = time.perf_counter()
            deltas = core.step()
            outboxes.step(core, deltas, rejected, time.perf_counter() - start)
        elif rejected or freed:
            outboxes.step(core, [], rejected, 0.0)


def python_log_level(name: str) -> int:
    """The logging level of a server's --log-level (uvicorn's names; its "trace" is below debug)."""
    return logging.DEBUG if name == "trace" else logging.getLevelName(name.upper())


def run_core_process(config, in_addr: str, out_addrs: list[str], parent_pid: int, log_level: str = "info") -> None:  # noqa: ANN001
    """Entry point of the engine-core process: load, warm up, report Ready, serve; exit non-zero on failure."""
    logging.basicConfig(level=python_log_level(log_level), format="%(levelname)s [engine core] %(message)s")
    # Ctrl-C reaches every process of the terminal's group, and so does a SIGTERM sent to the group (systemd, timeout,
    # an init that signals the group): the front ends drain and then stop the core, which must not die under the
    # streams they are finishing. It stops on Shutdown, when its parent goes, or by SIGKILL.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        core = EngineCore(config, on_stuck=_exit_stuck)
        core.warm_up()
        log.debug("%d start-up objects frozen out of garbage collection", freeze_startup_heap())
        core.runner.serve_host_threads()
        _report_late_compiles()
    except BaseException as e:  # noqa: BLE001 - reported to the front ends, which fail loudly
        log.critical("model load failed:\n%s", traceback.format_exc())
        outboxes = _Outboxes(zmq.Context.instance(), out_addrs, msgspec.msgpack.encode)
        outboxes.send_all(Failed(f"the model failed to load: {e}"), wait_s=60.0)  # front ends load tokenizers meanwhile
        outboxes.close()
        sys.exit(1)
    try:
        serve_core(core, in_addr, out_addrs, parent_pid=parent_pid)
    except BaseException:  # noqa: BLE001 - already logged and reported by serve_core
        sys.exit(1)
    finally:
        core.close()
        thaw_startup_heap()


def _exit_stuck(why: str) -> None:
    """A step waits for a tensor-parallel rank that is gone: end the process now (the front ends see it and fail its
    requests) rather than when the collective times out."""
    log.critical("%s; the engine core exits", why)
    os._exit(1)


def _report_late_compiles() -> None:
    """Log every Triton kernel compiled after warm-up: each compile stalls the whole batch for as long as it takes
    (hundreds of ms), which shows in a server's TTFT and inter-token tails; the log names the kernel and the
    argument specialization that was new, and how long it took."""
    try:
        from slipstream.kernels._device import on_compile

        on_compile(lambda kernel, seconds: log.warning("a kernel compiled after warm-up in %.0f ms: %s", 1e3 * seconds, kernel))
    except Exception:  # noqa: BLE001 - no Triton, or one without these hooks: a diagnostic must not stop the engine
        log.info("Triton's compile hooks are not available: late compiles go unreported")
