"""The processes of `slipstream serve`.

One front end (the default): this process serves HTTP and starts the engine core as its child. With
`--api-server-count N`, when one Python process cannot keep up with the streams (detokenizing, SSE, JSON), this
process only supervises: it listens on the port, starts the core for N front ends, and N front-end processes that
accept connections from the one listening socket; each sends its requests to the core over ZeroMQ and gets back
only its own requests' tokens.

Nothing dies quietly. A front end that exits unexpectedly, or a core that dies (its front ends notice, fail their
streams and exit non-zero), ends the whole server non-zero once the others have drained. SIGTERM or Ctrl-C:
the front ends stop admitting and drain for the grace period, then the core is told to stop.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("slipstream.server")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    grace_period: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    quiet: bool = False  # the engine core's start-up lines off (`--quiet`)

    @property
    def core_log_level(self) -> str:
        """The engine core's: the server's, or at least warning when quiet."""
        quieter = LOG_LEVELS.index("warning")
        return LOG_LEVELS[min(LOG_LEVELS.index(self.log_level), quieter)] if self.quiet else self.log_level

    def __post_init__(self) -> None:
        for name, ok, rule in (("port", 0 <= self.port <= 65535, "in [0, 65535]"), ("grace_period", self.grace_period >= 0, ">= 0"),
                               ("header_timeout", self.header_timeout > 0, "> 0"), ("body_timeout", self.body_timeout > 0, "> 0"),
                               ("log_level", self.log_level in LOG_LEVELS, f"one of {', '.join(LOG_LEVELS)}")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


def run_front_end(options: Any, http: HttpSettings, model: str | None, config: Any = None, attach: Any = None,
                  sock: socket.socket | None = None, metrics_dir: str | None = None, announce: bool = True) -> str | None:
    """Serve HTTP until SIGTERM / SIGINT or the engine's death; returns why the engine stopped, None after a clean
    shutdown. Starts the core from `config`, or attaches to one (`attach`, listening on `sock`). `announce`: say
    where the server listens once it is ready (one front end of several says it)."""
    import asyncio

    import uvicorn
    import uvicorn.logging

    from slipstream import loader
    from slipstream.engine.core_process import python_log_level
    from slipstream.server.app import build_app, uvicorn_config

    root = logging.getLogger("slipstream")
    if not root.handlers:  # this process's own lines look like uvicorn's beside them
        handler = logging.StreamHandler()
        handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(python_log_level(http.log_level))
    port = sock.getsockname()[1] if sock is not None else http.port  # --port 0: the one the system gave
    host = f"[{http.host}]" if ":" in http.host else http.host

    failed: list[BaseException] = []

    def on_dead(error: BaseException) -> None:
        """The engine core failed or died: open requests have their error; end the process non-zero."""
        failed.append(error)
        asyncio.get_running_loop().call_later(1.0, setattr, server, "should_exit", True)  # let streams send the error

    app = build_app(options, config=config, attach=attach, tokenizer=lambda: loader.load_tokenizer(model, options.tokenizer),
                    on_dead=on_dead, log_level=http.core_log_level, freeze_heap=True, metrics_dir=metrics_dir,
                    url=f"http://{host}:{port}" if announce else None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:
                app.state.begin_shutdown(http.grace_period)
            super().handle_exit(sig, frame)

    # uvicorn's own grace is a backstop: streams still open at the grace period end with an error event first.
    server = Server(uvicorn_config(app, http.host, http.port, http.log_level, http.grace_period + 5, http.header_timeout,
                                   http.body_timeout))
    server.run(sockets=None if sock is None else [sock])
    return str(failed[0]).splitlines()[0] if failed else None


def _front_end_main(index: int, options: Any, http: HttpSettings, model: str | None, attach: Any, sock: socket.socket,
                    metrics_dir: str) -> None:
    # Its own process group: a Ctrl-C in the terminal reaches the supervisor alone, which asks each front end
    # once (a second signal would make uvicorn skip the drain).
    os.setpgrp()
    attach.watch()  # now, while the core is known alive: a pid noticed later could already be another process's
    failed = run_front_end(options, http, model, attach=attach, sock=sock, metrics_dir=metrics_dir, announce=index == 0)
    if failed:
        sys.exit(f"slipstream front end {index}: the engine stopped: {failed}")


def listen(http: HttpSettings) -> socket.socket:
    """The server's port, taken before anything loads: a busy port is an error at once, not after the model loaded."""
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET  # as uvicorn picks it: `--host ::` is IPv6
    try:
        return socket.create_server((http.host, http.port), family=family, backlog=2048)
    except OSError as e:  # a busy port, or an address this host does not have
        flag = f"--port {http.port}" if e.errno == errno.EADDRINUSE else f"--host {http.host}"
        raise ValueError(f"{flag}: cannot listen on {http.host}:{http.port}: {e.strerror or e}") from None


def serve_with_front_ends(config: Any, options: Any, http: HttpSettings, model: str | None, count: int,
                          sock: socket.socket) -> str | None:
    """Supervise the core and `count` front ends, which accept on `sock`, until they have all stopped; returns why
    the server failed, None after a clean shutdown."""
    from slipstream.server.core_client import CoreProcess

    metrics_dir = tempfile.mkdtemp(prefix="slipstream-metrics-")
    ctx = multiprocessing.get_context("spawn")
    core = CoreProcess(config, http.core_log_level, clients=count)
    fronts = [ctx.Process(target=_front_end_main, name=f"slipstream-api-{i}",
                          args=(i, options, http, model, core.attach(i), sock, metrics_dir)) for i in range(count)]
    # the front ends' environment only (prometheus_client reads it at import): set while they start
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        for p in fronts:
            p.start()
    finally:
        if before is None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = before
    sock.close()  # the front ends hold it now
    stopping = False
    failure: str | None = None

    def stop(*_: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for p in fronts:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = {p.sentinel: p for p in fronts}
        core_gone = False
        while running:
            ready = multiprocessing.connection.wait([*running, *([] if core_gone else [core.proc.sentinel])])
            if core.proc.sentinel in ready and not core_gone:
                core_gone = True  # its front ends notice too: they fail their streams and exit non-zero
                if not stopping:
                    failure = failure or f"the engine core exited (code {core.proc.exitcode})"
            for s in ready:
                p = running.pop(s, None)
                if p is None:
                    continue
                p.join()
                # uvicorn ends a drained front end by re-raising the SIGTERM it was stopped with
                if p.exitcode != 0 and not (stopping and p.exitcode == -signal.SIGTERM):
                    failure = failure or f"front end {fronts.index(p)} exited (code {p.exitcode})"
                    log.error("slipstream: %s; stopping the others", failure)
                    stop()
        _stop_core(core, 10.0)  # the front ends have drained: a core that is ready stops at once
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in fronts:
            if p.is_alive():
                p.kill()
        if core.proc.is_alive():
            core.proc.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(core.dir, ignore_errors=True)
    return failure


def _stop_core(core: Any, timeout: float) -> None:
    """Every front end has stopped: tell the core to stop (a tensor-parallel core stops its ranks), kill it if it
    does not (one still loading reads no message; its ranks follow it when it goes)."""
    import msgspec
    import zmq

    from slipstream.engine.messages import Shutdown

    if core.alive():
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.PUSH)
            s.connect(core.in_addr)
            s.send(msgspec.msgpack.encode(Shutdown()))
            s.close(linger=1000)
        finally:
            ctx.term()
    core.join(timeout)
