"""The engine core as a busy loop behind two ZeroMQ sockets: requests in, one message per step out.

`slipstream serve` runs it in a process of its own (`run_core_process`), so that the GPU loop never waits for
the HTTP event loop, JSON, detokenization or the GIL they hold. Tests that already hold a loaded engine run the
same loop on a thread (`serve_core`). A failure is never silent: the loop sends `Failed` with the traceback,
logs it, and the process exits non-zero.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import msgspec
import zmq

from slipstream.engine.core import EngineCore, EngineOverloaded
from slipstream.engine.messages import (
    Abort, AddRequest, Failed, FinishSequences, Ready, Rejected, Shutdown, StepOut, ToCore,
)
from slipstream.heap import freeze_startup_heap

log = logging.getLogger("slipstream.core")
_IDLE_POLL_MS = 500  # an idle core wakes this often to notice that its front end has gone


def serve_core(core: EngineCore, in_addr: str, out_addr: str, ctx: zmq.Context | None = None,
               parent_pid: int | None = None) -> None:
    """Run `core` until a Shutdown message (or the death of process `parent_pid`). Raises what the core raises,
    after telling the front end."""
    if not core.serving.acquire(blocking=False):  # two loops stepping one core would steal each other's tokens
        raise RuntimeError("this engine core is already served by another loop")
    ctx = ctx or zmq.Context.instance()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.bind(in_addr)
    outbox.bind(out_addr)
    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(ToCore).decode
    try:
        outbox.send(encode(Ready(core.limits)))
        _loop(core, inbox, outbox, encode, decode, parent_pid)
    except BaseException as e:
        text = "".join(traceback.format_exception(e))
        log.critical("engine core failed:\n%s", text)
        outbox.send(encode(Failed(f"engine core failed: {e!r}\n{text}")))
        raise
    finally:
        inbox.close(linger=0)
        outbox.close(linger=2000)  # let the last message (Failed, or the final step) reach the front end
        core.serving.release()


def _loop(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, encode, decode, parent_pid: int | None) -> None:  # noqa: ANN001
    while True:
        rejected: list[Rejected] = []
        freed = False  # an abort or stop changed the gauges: report them even if no step runs
        timeout = 0 if core.has_unfinished() else _IDLE_POLL_MS
        while inbox.poll(timeout):
            timeout = 0
            msg = decode(inbox.recv())
            if isinstance(msg, AddRequest):
                try:
                    core.add_request(msg.request_id, msg.prompt_ids, msg.params, msg.priority)
                except (ValueError, EngineOverloaded) as e:
                    rejected.append(Rejected(msg.request_id, str(e), isinstance(e, EngineOverloaded)))
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    freed |= core.abort_request(rid)
            elif isinstance(msg, FinishSequences):
                for rid, index in msg.seqs:
                    core.finish_sequence(rid, index)
                freed = True
            elif isinstance(msg, Shutdown):
                return
        if parent_pid is not None and os.getppid() != parent_pid:
            log.error("the API front end is gone; the engine core stops")
            return
        core.check_ranks()  # a dead rank fails the engine now, idle or not, not at the next request
        if core.has_unfinished():
            start = time.perf_counter()
            deltas = core.step()
            outbox.send(encode(StepOut(deltas, core.snapshot(), time.perf_counter() - start, rejected)))
        elif rejected or freed:
            outbox.send(encode(StepOut([], core.snapshot(), 0.0, rejected)))


def run_core_process(config, in_addr: str, out_addr: str, parent_pid: int, log_level: str = "info") -> None:  # noqa: ANN001
    """Entry point of the engine-core process: load, warm up, report Ready, serve; exit non-zero on failure."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s [engine core] %(message)s")
    try:
        core = EngineCore(config)
        core.warm_up()
        log.info("%d start-up objects frozen out of garbage collection", freeze_startup_heap())
        _report_late_compiles()
    except BaseException as e:  # noqa: BLE001 - reported to the front end, which fails loudly
        log.critical("model load failed:\n%s", traceback.format_exc())
        ctx = zmq.Context.instance()
        out = ctx.socket(zmq.PUSH)
        out.bind(out_addr)
        out.send(msgspec.msgpack.encode(Failed(f"the model failed to load: {e}")))
        out.close(linger=2000)
        sys.exit(1)
    try:
        serve_core(core, in_addr, out_addr, parent_pid=parent_pid)
    except BaseException:  # noqa: BLE001 - already logged and reported by serve_core
        sys.exit(1)
    finally:
        core.close()



def _report_late_compiles() -> None:
    """Log every Triton kernel compiled after warm-up: each compile stalls the whole batch for as long as it takes
    (hundreds of ms), which shows in a server's TTFT and inter-token tails; the log names the kernel and the
    argument specialization that was new, and how long it took."""
    try:
        from slipstream.kernels._device import on_compile

        on_compile(lambda kernel, seconds: log.warning("a kernel compiled after warm-up in %.0f ms: %s", 1e3 * seconds, kernel))
    except Exception:  # noqa: BLE001 - no Triton, or one without these hooks: a diagnostic must not stop the engine
        log.info("Triton's compile hooks are not available: late compiles go unreported")
