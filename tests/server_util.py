"""A real uvicorn server on 127.0.0.1 in a background thread, around an already loaded engine (its core served
on a thread behind the same ZeroMQ sockets as the engine-core process)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

import httpx

from slipstream.server.app import ServerOptions, build_app, uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, engine, model_name: str = "smollm2", api_key: str | None = None, header_timeout: float = 10.0,
                 body_timeout: float = 30.0, **options) -> None:
        on_dead = options.pop("on_dead", None)
        self.app = build_app(ServerOptions(model_name, api_key, **options), core=engine.core, on_dead=on_dead)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, "warning", header_timeout=header_timeout,
                                                    body_timeout=body_timeout))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started or httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
