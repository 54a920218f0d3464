"""`slipstream serve` as a real process: 503 while loading, 200 when ready, SIGTERM finishes in-flight work."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_util import free_port


def test_serve_health_and_graceful_sigterm(gguf_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream.cli", "serve", gguf_path, "--port", str(port), "--device", "cpu",
         "--dtype", "float32", "--max-model-len", "512", "--grace-period", "60", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        statuses = []
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.1)
        assert statuses and statuses[-1] == 200, statuses
        assert 503 in statuses, "health should say 503 while the model loads"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            first = next(l for l in lines if l.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            proc.send_signal(signal.SIGTERM)  # mid-stream: the server must finish this request before exiting
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 40
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _start(gguf_path, port, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream.cli", "serve", gguf_path, "--port", str(port), "--device", "cpu",
         "--dtype", "float32", "--max-model-len", "512", "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_healthy(proc, url):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy: {proc.stdout.read().decode() if proc.poll() is not None else 'still loading'}")


@contextmanager
def _serving(gguf_path, *flags):
    """`slipstream serve` on a free port, healthy: (its process, its URL); killed afterwards if still running."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(gguf_path, port, *flags)
    try:
        _wait_healthy(proc, url)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _front_ends(proc) -> list[int]:
    """The server's front-end processes (`--api-server-count`): each leads a process group of its own."""
    return [p for p in _children(proc.pid) if os.getpgid(p) == p]


def _core_pid(proc) -> int:
    """The engine core among the server's children: not the resource tracker, and not a front end (each of those
    has a process group of its own)."""
    (core,) = [p for p in _children(proc.pid) if os.getpgid(p) == os.getpgid(proc.pid)
               and b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read()]
    return core


@pytest.mark.parametrize("front_ends", [1, 2])
def test_engine_core_killed_mid_stream_ends_streams_and_the_server(gguf_path, front_ends):
    """SIGKILL the engine-core process while streams are open: each ends with an error event and [DONE], and
    the server exits non-zero (so a supervisor restarts it) instead of staying up unhealthy; with two front ends,
    whichever holds a stream."""
    with _serving(gguf_path, "--api-server-count", str(front_ends)) as (proc, url):
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True, "stream": True}
        streams = [httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) for _ in range(3)]
        lines = []
        for s in streams:
            resp = s.__enter__()
            lines.append(resp.iter_lines())
            next(l for l in lines[-1] if l.startswith("data: "))  # streaming has begun
        os.kill(_core_pid(proc), signal.SIGKILL)
        for it in lines:
            rest = [l for l in it if l.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert "error" in json.loads(rest[-2][6:]), rest[-2]
        assert proc.wait(timeout=30) != 0


def test_serve_of_a_missing_model_exits_non_zero(tmp_path):
    proc = _start(str(tmp_path / "does-not-exist"), free_port())
    try:
        assert proc.wait(timeout=120) != 0
        said = proc.stdout.read().decode()
        assert "does not exist" in said and "load: the model failed to load" not in said, said  # (said once)
    finally:
        if proc.poll() is None:
            proc.kill()


class SilentCore:
    """A core process, for a front end's start: alive until `dies_at` (time.monotonic()), and says nothing."""

    owned = True

    def __init__(self, dies_at: float) -> None:
        from slipstream.server.core_client import _addresses

        self.dir, self.in_addr, (self.out_addr,) = _addresses()
        self.dies_at = dies_at

    def alive(self) -> bool:
        return time.monotonic() < self.dies_at


def test_a_core_that_dies_while_the_tokenizer_loads_ends_the_server_at_once():
    """The front end loads its tokenizer while the core loads the model; a core that dies meanwhile (a rank killed,
    out of memory) must end the server then, not once the tokenizer (and the grammar service's imports: tens of
    seconds on a loaded machine) have loaded, and the process's exit must not wait for the abandoned load."""
    script = """
import asyncio, sys, threading, time
from slipstream.server.core_client import AsyncEngineClient
from test_serve_process import SilentCore
async def main():
    client = AsyncEngineClient(SilentCore(time.monotonic() + 0.3))
    try:
        await client.start(threading.Event().wait)  # a load that never ends
    except RuntimeError as e:
        print(e, flush=True)
        sys.exit(1)
asyncio.run(main())
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1 and done.stdout == "the engine core exited while loading the model\n", done
    assert time.monotonic() - start < 15  # (an interpreter's start and imports, not the endless load)


def test_a_front_end_hears_a_failing_core_or_tokenizer_before_the_other_has_loaded():
    """The core reports a failed load (it waits for its front ends to connect, then exits) while the tokenizer still
    loads; a tokenizer that fails while the model still loads: each is an error at once."""
    import asyncio
    import threading

    import msgspec
    import zmq

    from slipstream.engine.messages import Failed
    from slipstream.server.core_client import AsyncEngineClient

    async def failing_core():
        core = SilentCore(time.monotonic() + 60)
        ctx = zmq.Context()
        out = ctx.socket(zmq.PUSH)
        out.bind(core.out_addr)
        client = AsyncEngineClient(core)
        out.send(msgspec.msgpack.encode(Failed("the model failed to load: no such file")))  # (once one connected)
        try:
            await asyncio.wait_for(client.start(threading.Event().wait), 5)
        finally:
            ctx.destroy(linger=0)

    def broken():
        raise ValueError("no tokenizer here")

    async def failing_tokenizer():
        await asyncio.wait_for(AsyncEngineClient(SilentCore(time.monotonic() + 60)).start(broken), 5)

    with pytest.raises(RuntimeError, match="no such file"):
        asyncio.run(failing_core())
    with pytest.raises(ValueError, match="no tokenizer here"):
        asyncio.run(failing_tokenizer())


def test_streams_cut_by_the_grace_period_end_with_an_error_and_done(gguf_path):
    """SIGTERM with --grace-period 2: a stream that would run for minutes ends after ~2 s with an error event and
    [DONE] (not a cut connection), and the server exits. Warm-up traffic is not in /metrics."""
    with _serving(gguf_path, "--grace-period", "2") as (proc, url):
        assert re.search(r"^slipstream:prompt_tokens_total\{[^}]*\} 0\.0$", httpx.get(url + "/metrics").text, re.M)
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            next(l for l in lines if l.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "shutting down" in json.loads(rest[-2][6:])["error"]["message"]
        assert time.monotonic() - start < 10
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_two_front_ends_share_the_port_the_core_and_the_metrics(gguf_path):
    """--api-server-count 2: concurrent requests over both front ends each get their own tokens (a prompt sent
    twice gets the same greedy text both times), /metrics counts every front end's requests, and SIGTERM drains a
    stream before the server exits, leaving no process behind. One of them says where the server listens."""
    with _serving(gguf_path, "--api-server-count", "2", "--grace-period", "60", "--log-level", "info") as (proc, url):
        fronts = _front_ends(proc)
        assert len(fronts) == 2

        def ask(i: int) -> str:
            # every eighth asks for 3 samples that all end in the same step (their request ends in that step)
            body = {"prompt": f"Count from {i % 8}:", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "stream": i % 2 == 1, "n": 3 if i % 8 == 2 else 1}
            with httpx.Client(timeout=120) as c:  # a connection each: the kernel spreads them over the front ends
                if not body["stream"]:
                    r = c.post(url + "/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    texts = {ch["text"] for ch in r.json()["choices"]}
                    assert len(r.json()["choices"]) == body["n"] and len(texts) == 1  # greedy: the n agree
                    return texts.pop()
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    events = [l[6:] for l in r.iter_lines() if l.startswith("data: ")]
                assert events[-1] == "[DONE]"
                return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(ask, range(32)))
        for i in range(8):
            assert len({texts[j] for j in range(i, 32, 8)}) == 1, [texts[j] for j in range(i, 32, 8)]
        metrics = httpx.get(url + "/metrics").text
        done = sum(float(v) for v in re.findall(r"^slipstream:request_success_total\{[^}]*\} (\S+)$", metrics, re.M))
        assert done == 32 + 4 * 2, metrics  # samples: 4 of the requests had 3
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            next(l for l in lines if l.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "error" not in rest[-2], rest[-2:]
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-3000:]
        assert not [p for p in fronts if os.path.exists(f"/proc/{p}")]
        said = re.findall(r"^INFO: +ready: (\S+) on (\S+) ", proc.stdout.read().decode(), re.M)
        assert said == [(os.path.basename(gguf_path), url)], said


def _connections(pid: int) -> set[int]:
    """The client-side ports of the TCP connections process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if f[9] in inodes:
            ports.add(int(f[2].split(":")[1], 16))
    return ports


def test_a_front_end_that_dies_ends_the_server_non_zero(gguf_path):
    """SIGKILL one of two front ends while both stream: the core does not wait on the dead one (its requests are
    aborted), the other's streams finish whole, and then the server stops instead of going on half alive: it exits
    non-zero, naming what died, with the core gone too."""
    with _serving(gguf_path, "--api-server-count", "2", "--grace-period", "60") as (proc, url):
        fronts = _front_ends(proc)
        core = _core_pid(proc)
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 48, "ignore_eos": True, "temperature": 0, "stream": True}
        opened, ports, lines = [], [], []
        while len(ports) < 24:  # streams, one connection each, until both front ends hold some (and 4 at least)
            opened.append(httpx.stream("POST", url + "/v1/completions", json=body, timeout=60))
            resp = opened[-1].__enter__()
            lines.append(resp.iter_lines())
            next(l for l in lines[-1] if l.startswith("data: "))
            ports.append(resp.extensions["network_stream"].get_extra_info("client_addr")[1])
            held = {p: _connections(p) for p in fronts}
            if len(ports) >= 4 and all(held[p] & set(ports) for p in fronts):
                break
        assert all(held[p] & set(ports) for p in fronts), "the kernel gave every connection to one front end"
        victim = fronts[0]
        survivors = [i for i, port_ in enumerate(ports) if port_ not in held[victim]]
        os.kill(victim, signal.SIGKILL)
        for i in survivors:
            rest = [l for l in lines[i] if l.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and "error" not in rest[-2], rest[-2:]
        assert proc.wait(timeout=60) != 0
        assert re.search(r"front end \d exited", proc.stdout.read().decode())
        assert not os.path.exists(f"/proc/{core}") and not [p for p in fronts if os.path.exists(f"/proc/{p}")]


def test_listen_takes_ipv6_hosts():
    """`--host ::` listens on IPv6 (as uvicorn chose by the host), and a busy port is a one-line error."""
    import socket

    from slipstream.server.launch import HttpSettings, listen

    try:
        sock = listen(HttpSettings(host="::1", port=0))
    except ValueError as e:
        pytest.skip(f"no IPv6 here: {e}")
    try:
        assert sock.family == socket.AF_INET6
        with pytest.raises(ValueError, match=r"^--port \d+: cannot listen on ::1:"):
            listen(HttpSettings(host="::1", port=sock.getsockname()[1]))
    finally:
        sock.close()


def test_quiet_turns_the_engine_cores_start_up_lines_off_and_nothing_else():
    from slipstream.server.launch import HttpSettings

    assert HttpSettings(quiet=True).core_log_level == "warning"  # (its loading / weights / ready lines are info)
    assert HttpSettings(log_level="error", quiet=True).core_log_level == "error"
    assert HttpSettings(log_level="debug").core_log_level == "debug"
