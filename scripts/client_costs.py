"""Whether `slipstream bench serve`'s client keeps up: it drives a stub server (in another process, streaming each
request's tokens 2 ms apart, as a fast engine would) at the given rates, 400 requests of 200 tokens each, and prints
the request throughput it reached against the Poisson schedule's own, and the CPU seconds the client spent. A client
that lags the schedule or saturates its core would report its own limits as the server's.

usage: python3 scripts/client_costs.py [RATE ...]   (default: 40 80 inf)
"""
from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time

import httpx

from slipstream.bench.serve_bench import run_rate

STUB = '''
import asyncio, orjson
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

async def completions(request):
    n = (await request.json())["max_tokens"]
    async def events():
        for i in range(n):
            yield b"data: " + orjson.dumps({"choices": [{"index": 0, "text": " w%d" % i}]}) + b"\\n\\n"
            await asyncio.sleep(0.002)
        yield b"data: " + orjson.dumps({"choices": [], "usage": {"completion_tokens": n}}) + b"\\n\\ndata: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
'''


def main() -> None:
    rates = [float(r) for r in sys.argv[1:]] or [40.0, 80.0, float("inf")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stub = subprocess.Popen([sys.executable, "-c", STUB + f"\nimport uvicorn\nuvicorn.run(app, port={port}, log_level='warning')"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        prompts = [("hello", 1, 200)] * 400
        for rate in rates:
            rng = random.Random(0)
            schedule = sum(rng.expovariate(rate) for _ in prompts) if rate != float("inf") else 0.0
            cpu = time.process_time()
            r = asyncio.run(run_rate(url, "stub", prompts, rate, None, (1.0, 1.0), 0))
            cpu = time.process_time() - cpu
            print(f"rate {rate:g}: {r['request_throughput']:.2f} req/s over {r['duration_s']:.2f} s (arrivals end at "
                  f"{schedule:.2f} s, the last stream 0.4 s later), client CPU {cpu:.2f} s, latest send "
                  f"{1e3 * r['max_send_lag_s']:.1f} ms behind the schedule, failed {r['failed']}")
    finally:
        stub.terminate()
        stub.wait()


if __name__ == "__main__":
    main()
