"""`slipstream serve` under concurrent load, as users drive it: prompts of many lengths, streaming and not, a
quarter of the clients hanging up early, a tenth held to a regular expression (structured output), a fifth opening
with one shared head (prefix cache hits). Passes only with zero failed requests, every admitted request
finished or aborted, and every KV page free afterwards, and no kernel variant first used after
warm-up (the engine logs each; one is a stall for every stream). On the GPU (scripts/gpu_check.sh) it runs in bf16 on the
Hopper kernels with prompts of 65 to 16K tokens; on a CPU, small sizes check the script itself.

usage: python3 scripts/serve_check.py MODEL [--load-format dummy] [--requests 200] [--max-prompt 16384] [serve flags...]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+-]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else math.nan


async def one(client: httpx.AsyncClient, url: str, pattern: str, i: int, prompt: list[int], max_tokens: int, stream: bool,
              hang_up: bool) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": stream}
    if i % 10 == 1 and not hang_up:  # constrained: ends when the pattern is complete, and must match it
        body.update(ignore_eos=False, max_tokens=32, guided_regex=pattern)
        r = await client.post(url + "/v1/completions", json=body, timeout=600)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        choice = r.json()["choices"][0]
        # (stripped: a word-level tokenizer's text puts a space before each word)
        ok = re.fullmatch(pattern, choice["text"].strip()) and choice["finish_reason"] == "stop"
        return "ok" if ok else f"constrained output {choice['text']!r} ({choice['finish_reason']})"
    if not stream:
        try:
            r = await client.post(url + "/v1/completions", json=body, timeout=0.3 if hang_up else 600)
        except httpx.TimeoutException:
            return "left" if hang_up else "timeout"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        got = r.json()["usage"]["completion_tokens"]
        return "ok" if got == max_tokens else f"{got} of {max_tokens} tokens"
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        seen, usage = 0, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return f"error event: {chunk['error']['message']}"
            seen += 1
            if hang_up and seen >= 2:
                return "left"
            usage = chunk.get("usage") or usage
    return "ok" if usage and usage["completion_tokens"] == max_tokens else f"usage {usage} for {max_tokens} tokens"


async def drive(url: str, n: int, max_prompt: int, vocab: int, pattern: str) -> list[str]:
    rng = random.Random(0)
    # every fifth prompt opens with the same tokens, as a system prompt does: the prefix cache serves them to the
    # later ones, whose prefills then run over a cached head (kernel variants of their own)
    system = [rng.randrange(3, vocab) for _ in range(min(300, max_prompt // 2))]
    jobs = []
    for i in range(n):
        length = int(math.exp(rng.uniform(math.log(65), math.log(max_prompt))))
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        jobs.append((i, system + prompt[: max(1, max_prompt - len(system))] if i % 5 == 1 else prompt, rng.randint(16, 128), i % 2 == 0, i % 4 == 3))
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        return list(await asyncio.gather(*(one(client, url, pattern, *j) for j in jobs)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-prompt", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--regex", default=r"[a-z]{3,8}-[0-9]{2}",
                    help="what every tenth request's output is held to (one the model's vocabulary can spell)")
    a, serve_flags = ap.parse_known_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "slipstream.cli", "serve", a.model, "--port", str(port), "--log-level", "warning",
           "--max-model-len", str(a.max_prompt + 256), *serve_flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    late = []  # a kernel variant warm-up missed stalls every stream while it compiles (or loads from Triton's cache)

    def relay() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            if "compiled after warm-up" in line:
                late.append(line.strip())

    threading.Thread(target=relay, daemon=True).start()
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the server did not become healthy"
            time.sleep(0.5)
        start = time.time()
        results = asyncio.run(drive(url, a.requests, a.max_prompt, a.vocab, a.regex))
        elapsed = time.time() - start
        failures = [r for r in results if r not in ("ok", "left")]
        deadline = time.time() + 60
        while metric(url, "slipstream:num_requests_running") or metric(url, "slipstream:num_requests_waiting"):
            if time.time() > deadline:
                failures.append("requests still in the engine a minute after every client finished or left")
                break
            time.sleep(0.2)
        time.sleep(1.0)  # the step that reports the last aborts
        free, total = metric(url, "slipstream:kv_cache_free_blocks"), metric(url, "slipstream:kv_cache_total_blocks")
        if free != total:
            failures.append(f"{total - free:.0f} KV blocks still held")
        if httpx.get(url + "/health").status_code != 200:
            failures.append("unhealthy after the load")
        failures += [f"kernel variant first used after warm-up: {line}" for line in late]
        print(f"serve check: {a.requests} requests ({results.count('ok')} finished, {results.count('left')} left early) "
              f"in {elapsed:.1f} s, prompts 65..{a.max_prompt} tokens; failures: {len(failures)}")
        for f in failures[:20]:
            print("  FAIL", f)
        return 1 if failures else 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
