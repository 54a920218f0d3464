"""`slipstream serve` as a real process: 503 while loading, 200 when ready, SIGTERM finishes in-flight work."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx

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
