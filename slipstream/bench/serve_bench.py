"""Online serving benchmark against any OpenAI-compatible server (slipstream, vLLM, llama.cpp, ...).

Prompts come from ShareGPT (the original JSON: prompt = first human turn, output length = the reply's length
in tokens, vLLM's filters) or random lengths. Requests arrive as a Poisson process at each given rate (or at a
fixed concurrency), stream their completions with max_tokens = the target length and ignore_eos, and we report
request throughput, output tok/s, TTFT / TPOT / ITL (mean, p50, p90, p99) and goodput under an SLO.

With --structured json every request also carries a JSON schema (`response_format`, round robin over SCHEMAS: the
grammars stay cached after their first use); with json-unique each request's schema is new (an extra required
property named after the request), so every request waits for a fresh compile. A constrained output ends when its
JSON is complete, so compare output tok/s; the report counts the outputs that parse, and those that ended before
max_tokens without parsing (a broken constraint: always 0)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import aiohttp

from slipstream.bench.common import table


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_len: int = 0
    error: str = ""
    text: str = ""
    max_tokens: int = 0


_ADDRESS = {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                              "postcode": {"type": "string", "pattern": "[0-9]{5}"}},
            "required": ["street", "city"]}
SCHEMAS: list[dict] = [  # the shapes agents ask for: nested objects, enums, arrays, optional fields, bounded numbers
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "address": _ADDRESS}, "required": ["name", "age", "address"]},
    {"type": "object", "properties": {
        "status": {"enum": ["open", "closed", "pending"]}, "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8}, "summary": {"type": "string"}},
     "required": ["status", "priority", "tags", "summary"]},
    {"type": "object", "properties": {
        "order_id": {"type": "string"}, "total": {"type": "number", "minimum": 0},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}}, "required": ["sku", "quantity"]}},
        "note": {"type": ["string", "null"]}}, "required": ["order_id", "total", "items"]},
    {"type": "object", "properties": {
        "function": {"enum": ["search", "fetch", "summarize"]},
        "arguments": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                      "required": ["query"]}, "reason": {"type": "string"}}, "required": ["function", "arguments"]},
]


def schema_for(i: int, unique: bool) -> dict:
    schema = SCHEMAS[i % len(SCHEMAS)]
    if not unique:
        return schema
    key = f"request_{i}"
    return {**schema, "properties": {**schema["properties"], key: {"type": "integer"}}, "required": [*schema["required"], key]}


def sharegpt(path: str, tokenizer, n: int, seed: int) -> list[tuple[str, int, int]]:  # noqa: ANN001
    with open(path) as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out = []
    for c in convs:
        prompt, reply = c[0]["value"], c[1]["value"]
        p_len, o_len = len(tokenizer.encode(prompt)), len(tokenizer.encode(reply))
        if p_len < 4 or o_len < 4 or p_len > 1024 or p_len + o_len > 2048:  # vLLM's benchmark filters
            continue
        out.append((prompt, p_len, o_len))
        if len(out) == n:
            break
    return out


def random_prompts(tokenizer, n: int, in_len: int, out_len: int, seed: int) -> list[tuple[list[int], int, int]]:  # noqa: ANN001
    rng = random.Random(seed)
    vocab = min(tokenizer.vocab_size, 30000)
    res = []
    for _ in range(n):
        i, o = rng.randint(in_len // 2, in_len * 3 // 2), rng.randint(out_len // 2, out_len * 3 // 2)
        res.append(([rng.randint(10, vocab - 1) for _ in range(i)], i, o))
    return res


async def one(session: aiohttp.ClientSession, url: str, model: str, prompt, p_len: int, o_len: int,  # noqa: ANN001
              schema: dict | None = None) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": o_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    r = Result(prompt_len=p_len, max_tokens=o_len)
    start = last = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return r
            async for line in _sse_lines(resp):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    r.text += chunk["choices"][0]["text"]
                    if r.ttft == 0.0:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
        r.e2e = time.perf_counter() - start
        r.ok = r.output_tokens > 0
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # fails its request, not the run
        r.error = repr(e)
    return r


async def _sse_lines(resp: aiohttp.ClientResponse):  # noqa: ANN202
    """The stream's lines as bytes, split at LF only (as SSE splits them; JSON text may carry U+2028 raw, which a
    str.splitlines would break at), whatever the network's chunking."""
    rest = b""
    async for data in resp.content.iter_any():
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if rest:
        yield rest


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _summary(name: str, xs: list[float]) -> dict[str, float]:
    return {f"{name}_mean_ms": 1e3 * sum(xs) / len(xs) if xs else float("nan"),
            **{f"{name}_p{p}_ms": 1e3 * _pct(xs, p) for p in (50, 90, 99)}}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def run_rate(url: str, model: str, prompts: list, rate: float, concurrency: int | None, slo: tuple[float, float],
                   seed: int, structured: str = "none") -> dict:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    # aiohttp, not httpx: httpx's connection pool scans every connection on each request's state change, so with
    # hundreds of open streams the client itself became the bottleneck (a CPU profile: 40% of its time there)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600.0)) as session:
        async def gated(p, schema):  # noqa: ANN001, ANN202
            if sem is None:
                return await one(session, url, model, *p, schema)
            async with sem:
                return await one(session, url, model, *p, schema)

        tasks = []
        start = arrival = time.perf_counter()
        late = 0.0  # the most any request was sent after its time on the schedule
        for i, p in enumerate(prompts):
            schema = None if structured == "none" else schema_for(i, structured == "json-unique")
            late = max(late, time.perf_counter() - arrival)
            tasks.append(asyncio.create_task(gated(p, schema)))
            if rate != float("inf"):
                # each arrival at its own time on the Poisson schedule: a late wake-up shortens the next wait,
                # where sleeping the bare interval would add every wake-up's lateness to all later arrivals
                arrival += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        results: list[Result] = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = [r for r in ok if r.ttft <= slo[0] and (r.output_tokens <= 1 or (r.e2e - r.ttft) / (r.output_tokens - 1) <= slo[1])]
    out_tokens = sum(r.output_tokens for r in ok)
    return {"request_rate": rate, "max_concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": [r.error for r in results if not r.ok][:5], "duration_s": elapsed,
            "request_throughput": len(ok) / elapsed, "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + sum(r.prompt_len for r in ok)) / elapsed, "goodput_req_s": len(good) / elapsed,
            "mean_output_tokens": out_tokens / max(1, len(ok)), "structured": structured, "max_send_lag_s": late,
            "json_complete": None if structured == "none" else sum(_parses(r.text) for r in ok),
            "json_broken": None if structured == "none" else sum(r.output_tokens < r.max_tokens and not _parses(r.text) for r in ok),
            # each prompt's output tokens, in prompt order (None: it failed): another run can do exactly this work
            # (--output-lens-from)
            "output_lens": [r.output_tokens if r.ok else None for r in results],
            **_summary("ttft", [r.ttft for r in ok]), **_summary("tpot", tpot), **_summary("itl", [x for r in ok for x in r.itl])}


def run(a: argparse.Namespace) -> list[dict]:
    from slipstream.loader import load_tokenizer

    url = a.base_url.rstrip("/").removesuffix("/v1")  # the server's root, as given or as OpenAI clients take it
    try:
        served, root = _first_model(url)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise ValueError(f"--base-url {a.base_url}: no OpenAI-compatible server answers /v1/models there ({e or type(e).__name__})") from None
    model = a.model or served
    tokenizer = a.tokenizer or root
    if tokenizer is None or not os.path.exists(os.path.expanduser(tokenizer)):
        why = f"{a.tokenizer!r} does not exist" if a.tokenizer else f"the server's model ({root or 'unnamed'}) is not here"
        raise ValueError(f"--tokenizer: {why}; give the model's tokenizer (an HF directory or a .gguf file)")
    tok = load_tokenizer(tokenizer)
    if a.dataset == "random":
        prompts = random_prompts(tok, a.num_prompts, a.random_input_len, a.random_output_len, a.seed)
    else:
        prompts = sharegpt(a.dataset, tok, a.num_prompts, a.seed)
    if a.output_lens_from:
        prompts = _same_work(prompts, a.output_lens_from)
    results = []
    rows = [["rate", "req/s", "out tok/s", "out len (mean)", "TTFT mean/p50/p99 ms", "TPOT mean/p50/p99 ms", "ITL p99 ms",
             f"goodput req/s (TTFT <= {a.slo_ttft_ms:g}, TPOT <= {a.slo_tpot_ms:g} ms)",
             "failed", "JSON complete/broken"]]
    for rate in a.request_rate:
        r = asyncio.run(run_rate(url, model, prompts, rate, a.max_concurrency, (a.slo_ttft_ms / 1e3, a.slo_tpot_ms / 1e3),
                                 a.seed, a.structured))
        r["label"] = a.label
        results.append(r)
        rows.append([f"{rate:g}", f"{r['request_throughput']:.2f}", f"{r['output_tok_s']:.0f}", f"{r['mean_output_tokens']:.0f}",
                     f"{r['ttft_mean_ms']:.0f}/{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}",
                     f"{r['tpot_mean_ms']:.1f}/{r['tpot_p50_ms']:.1f}/{r['tpot_p99_ms']:.1f}", f"{r['itl_p99_ms']:.1f}",
                     f"{r['goodput_req_s']:.2f}", r["failed"],
                     "-" if r["json_complete"] is None else f"{r['json_complete']}/{r['json_broken']}"])
    print(f"{a.label or url}: {len(prompts)} prompts, {a.dataset}, structured {a.structured}")
    print(table(rows))
    for r in results:
        if r["request_rate"] != float("inf") and r["max_send_lag_s"] > 0.05:
            # a client that sends late measures itself, not the server: a slower rate than asked, lighter load
            print(f"warning: at rate {r['request_rate']:g} a request was started {1e3 * r['max_send_lag_s']:.0f} ms after "
                  "its time on the schedule (this client was busy): the rate reached is the client's")
    if a.plot and len(results) > 1:
        _plot(results, a.plot)
    return results


def _same_work(prompts: list, path: str) -> list:
    """The prompts, each asking for as many output tokens as it produced in the run saved at `path` (`--json` of a run
    on the same prompts): a constrained run whose answers end once their JSON is complete (33 of 512 at 256 concurrent,
    H100) writes about 5% fewer tokens than an unconstrained one that runs each to its length, and its output tok/s
    compares less work. A prompt that failed there keeps its own length."""
    try:
        lens = json.load(open(path))["results"][0]["output_lens"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--output-lens-from {path}: not the --json of a `slipstream bench serve` run ({e})") from None
    if len(lens) != len(prompts):
        raise ValueError(f"--output-lens-from {path}: that run had {len(lens)} prompts, this one {len(prompts)}: the same "
                         "--dataset, --num-prompts and --seed make the same prompts")
    return [(p, p_len, n if n else o_len) for (p, p_len, o_len), n in zip(prompts, lens)]


def _first_model(url: str) -> tuple[str, str | None]:
    """The server's first model: its name, and where it was loaded from if the server says (`root`, as vLLM's do)."""
    async def get() -> tuple[str, str | None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                session.get(url + "/v1/models") as resp:
            resp.raise_for_status()
            card = (await resp.json())["data"][0]
            return card["id"], card.get("root")
    return asyncio.run(get())


def _plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rates = [r["request_rate"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for p in ("p50", "p90", "p99"):
            ax.plot(rates, [r[f"{metric}_{p}_ms"] for r in results], marker="o", label=p)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="online benchmark against an OpenAI-compatible server")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer that measures prompt/output lengths: an HF directory or "
                   "a .gguf file (default: the model the server says it loaded, if it is on this machine)")
    p.add_argument("--dataset", default="random", help="path to a ShareGPT JSON file, or 'random'")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=512,
                   help="random dataset: mean prompt tokens (each prompt drawn uniformly from half to 1.5 times it)")
    p.add_argument("--random-output-len", type=int, default=128,
                   help="random dataset: mean output tokens (each drawn uniformly from half to 1.5 times it)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests per second, Poisson arrivals; one run per rate (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="goodput counts requests whose time to first token is at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="... and whose mean time per output token is at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--structured", default="none", choices=["none", "json", "json-unique"],
                   help="a JSON schema on every request: json cycles through a few (cached after first use), "
                        "json-unique sends a new one each time (compiled fresh)")
    p.add_argument("--output-lens-from", default=None, metavar="RUN.json",
                   help="ask each prompt for as many tokens as it produced in that run (its --json): the same work, "
                        "e.g. unconstrained against a constrained run whose answers end when their JSON does")
    p.add_argument("--label", default="")
    p.add_argument("--plot", default=None, help="PNG of latency percentiles vs request rate")
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=run)
