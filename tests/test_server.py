"""A real HTTP server on 127.0.0.1 driven by the official `openai` client (and raw httpx for bad input)."""
import json
import re

import httpx
import openai
import pytest

from conftest import assert_no_leak
from server_util import LiveServer
from slipstream import LLM, SamplingParams

MODEL = "smollm2"


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, dtype="float32", device="cpu", max_model_len=512, max_waiting=600)


@pytest.fixture(scope="module")
def server(llm):
    with LiveServer(llm.engine, MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_health_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_offline_generate(server, client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(llm.engine.tokenize(prompt))
    # the offline API on an engine with the same weights and settings
    offline = LLM(llm.engine.model_path, dtype="float32", device="cpu", max_model_len=512)
    assert r.choices[0].text == offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text


def test_streaming_completion_and_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_streamed_events_survive_a_splitlines_reader(server):
    """Text holding U+2028 / U+0085 (here echoed from the prompt) streams as events that httpx's aiter_lines, which
    splits at every str.splitlines break, still reads whole."""
    body = {"model": MODEL, "prompt": "a\u2028b\x85c", "echo": True, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]).startswith("a\u2028b\x85c")


def test_chat_stop_and_streaming(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content
    cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0, stop=["Paris"])
    assert cut.choices[0].finish_reason == "stop" and "Paris" not in cut.choices[0].message.content


def test_logprobs_n_and_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    assert len(c.choices[0].logprobs.token_logprobs) == 4 and len(c.choices[0].logprobs.top_logprobs[0]) == 3
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices] and len(a.choices) == 2
    assert a.usage.completion_tokens == 16
    # streamed, samples that end at different steps (a stop string): each choice ends once, with the text it has
    for chunks in (client.completions.create(**kw, stop=" ", stream=True),
                   client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name animals."}],
                                                  max_tokens=8, temperature=1.0, seed=7, n=3, stop=" ", stream=True)):
        ends, texts = {}, {}
        for c in chunks:
            for ch in c.choices:
                piece = ch.text if hasattr(ch, "text") else ch.delta.content
                texts[ch.index] = texts.get(ch.index, "") + (piece or "")
                if ch.finish_reason is not None:
                    ends[ch.index] = ends.get(ch.index, 0) + 1
        assert ends and all(v == 1 for v in ends.values()) and set(ends) == set(texts), ends


def test_multiple_prompts_and_token_ids(client, llm):
    ids = llm.engine.tokenize("Once upon a time")
    r = client.completions.create(model=MODEL, prompt=[ids, llm.engine.tokenize("Hello there")], max_tokens=3, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    alone = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.choices[0].text == alone.choices[0].text
    texts = client.completions.create(model=MODEL, prompt=["Hello there", "Once upon a time"], max_tokens=3, temperature=0)
    assert {c.index: c.text for c in texts.choices}[1] == alone.choices[0].text


BAD = [
    ("completions", b"{not json", "invalid_request_error"),
    ("chat/completions", {"model": MODEL}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "a user message needs content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]},
     "a system message needs content"),
    ("completions", {"model": MODEL, "prompt": 5}, "prompt: must be one of str, list[str], list[int], list[list[int]]"),
    # the form of the value that got furthest speaks, at the place the client wrote it (no pydantic union tags)
    ("completions", {"model": MODEL, "prompt": [1, -2]}, "prompt.1: Input should be greater than or equal to 0"),
    ("completions", {"model": MODEL, "prompt": [[1], [2, "x"]]}, "prompt.1.1: Input should be a valid integer"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content.0.type: Input should be 'text'"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"50256": 1000}}, "logit_bias.50256: Input should be less"),
    ("completions", {"model": MODEL, "prompt": [1, 2, 3, "x"]}, "prompt.3: Input should be a valid integer"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function.name: "),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "maybe"},
     "tool_choice: must be one of 'none', 'auto', 'required', an object"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 2}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": True}, "max_tokens: Value error, a boolean is not a number"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": True}, "temperature: Value error, a boolean is not"),
    ("completions", {"model": MODEL, "prompt": [1, True]}, "prompt.1: Input should be a valid"),  # (not token 1)
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_model_len"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 10**6}, "max_model_len"),
]


@pytest.mark.parametrize("path, body, mentions", BAD)
def test_bad_input_is_a_400_and_the_server_keeps_serving(server, client, path, body, mentions):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and mentions in json.dumps(err)
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_unknown_model_is_404_and_unknown_fields_ignored(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "frobnicate": 1, "user": "u"})
    assert r.status_code == 200


def test_api_key(gguf_path):
    # Its own engine: a core is served by one loop at a time, and the module's server holds `llm`'s.
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256)
    with LiveServer(llm.engine, MODEL, api_key="sekret") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        body = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert body.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_load_with_random_disconnects(server, llm):
    """160 concurrent streams (loopback only, bounded); a quarter of the clients hang up mid-stream."""
    import asyncio
    import random

    rng = random.Random(0)
    jobs = [(i, rng.randint(4, 16), rng.random() < 0.25) for i in range(160)]

    async def one(client: httpx.AsyncClient, i: int, max_tokens: int, hang_up: bool) -> int | None:
        body = {"model": MODEL, "prompt": f"Request {i}: count with me,", "max_tokens": max_tokens, "temperature": 0.8,
                "seed": i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        tokens = None
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                seen += 1
                if hang_up and seen >= 2:
                    return None  # leaving the block closes the connection mid-stream
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, *j) for j in jobs)), 600)

    results = asyncio.run(main())
    for (i, max_tokens, hang_up), got in zip(jobs, results):
        if not hang_up:
            assert got == max_tokens, (i, got, max_tokens)
    import time

    deadline = time.time() + 30
    while metric(server, "slipstream:num_requests_running") or metric(server, "slipstream:num_requests_waiting"):
        assert time.time() < deadline, "requests still in the engine after every client finished or left"
        time.sleep(0.2)
    assert metric(server, "slipstream:kv_cache_free_blocks") == metric(server, "slipstream:kv_cache_total_blocks")
    assert metric(server, 'slipstream:request_success_total') >= 1
    text = httpx.get(server.url + "/metrics").text
    assert 'finished_reason="abort"' in text and "slipstream:time_to_first_token_seconds_count" in text
    for kind in ("decode", "mixed"):  # steps by kind (their device time is 0 on a CPU)
        n = re.search(r'^slipstream:engine_steps_total\{[^}]*kind="%s"[^}]*\} (\S+)$' % kind, text, re.M)
        assert n and float(n.group(1)) >= 1, kind
        assert re.search(r'^slipstream:engine_step_device_seconds_total\{[^}]*kind="%s"' % kind, text, re.M)
    assert not llm.engine.requests


def test_prompt_logprobs_and_echo_with_logprobs(server, llm):
    """vLLM's prompt_logprobs (in each completion choice, beside a chat's choices) and OpenAI's echo + logprobs
    (the prompt's tokens lead the logprobs, the first without one): the figures the engine computes for the prompt,
    streamed in a choice's first chunk too; a stream that cannot carry them is a 400 naming the field."""
    prompt = "The capital of France is"
    # (an engine of its own: the served one is stepped by the server's thread, and two threads must not step one engine)
    offline = LLM(llm.engine.model_path, dtype="float32", device="cpu", max_model_len=512)
    ref = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2))[0]
    ids = ref.prompt_token_ids
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    c = httpx.post(server.url + "/v1/completions", json={**body, "prompt_logprobs": 2}, timeout=60).json()["choices"][0]
    pl = c["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    for tok, got, (rank, want) in zip(ids[1:], pl[1:], ref.prompt_logprobs[1:]):
        assert got[str(tok)]["logprob"] == pytest.approx(want[tok]) and got[str(tok)]["rank"] == rank
        assert len(got) in (2, 3) and all(v["decoded_token"] == llm.tokenizer.decode([int(k)]) for k, v in got.items())
    e = httpx.post(server.url + "/v1/completions", json={**body, "echo": True, "logprobs": 1}, timeout=60).json()["choices"][0]
    lp = e["logprobs"]
    assert e["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx([s[1][t] for t, s in zip(ids[1:], ref.prompt_logprobs[1:])])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and "".join(lp["tokens"][len(ids):]) == e["text"][len(prompt):]
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "echo": True, "logprobs": 1, "prompt_logprobs": 0,
                                                                    "stream": True}, timeout=60) as r:
        events = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"].startswith(prompt) and first["logprobs"]["tokens"][: len(ids)] == lp["tokens"][: len(ids)]
    assert first["prompt_logprobs"][0] is None and all(str(t) in p for t, p in zip(ids[1:], first["prompt_logprobs"][1:]))
    assert all("prompt_logprobs" not in ev["choices"][0] for ev in events[1:])
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == r["usage"]["prompt_tokens"]
    for bad, param in (({**chat, "stream": True}, "prompt_logprobs"),):
        resp = httpx.post(server.url + "/v1/chat/completions", json=bad, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    for bad, param in (({**body, "prompt_logprobs": 0, "stream": True, "n": 2}, "prompt_logprobs"),
                       ({**body, "echo": True, "logprobs": 0, "stream": True, "n": 2}, "echo"),
                       ({**body, "prompt_logprobs": 21}, "prompt_logprobs")):
        resp = httpx.post(server.url + "/v1/completions", json=bad, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


@pytest.mark.parametrize("front_ends", [1, 2])
def test_the_core_routes_deltas_to_their_front_end_and_forgets_ended_requests(tmp_path, front_ends):
    """Each front end gets its own requests' deltas (every sample of a request that ends whole in this step), its
    own refusals, and the step's time once among them; the core then forgets the requests that ended, with one
    front end as with several."""
    import msgspec
    import zmq

    from slipstream.engine.core_process import _Outboxes
    from slipstream.engine.core_stats import CoreStats
    from slipstream.engine.messages import FromCore, Rejected
    from slipstream.engine.outputs import SeqDelta

    class Core:
        requests: dict = {}  # both requests ended in this step

        def snapshot(self) -> CoreStats:
            return CoreStats()

    ctx = zmq.Context()
    addrs = [f"ipc://{tmp_path}/out{i}" for i in range(front_ends)]
    box = _Outboxes(ctx, addrs, msgspec.msgpack.Encoder().encode)
    pulls = []
    for a in addrs:
        pulls.append(ctx.socket(zmq.PULL))
        pulls[-1].connect(a)
    try:
        assert all(s.poll(10_000, zmq.POLLOUT) for s in box.socks)  # connected (the core waits so for Ready)
        box.owner.update({"a": 0, "b": front_ends - 1})
        deltas = [SeqDelta("a", 0, [1], finish_reason="length"), SeqDelta("b", 0, [2], finish_reason="length"),
                  SeqDelta("b", 1, [3], finish_reason="stop"), SeqDelta("gone", 0, [4])]
        box.step(Core(), deltas, [(front_ends - 1, Rejected("c", "refused", False))], 0.5)
        got = [msgspec.msgpack.Decoder(FromCore).decode(p.recv()) for p in pulls]
        seen = [[(d.request_id, d.index) for d in g.deltas] for g in got]
        if front_ends == 1:
            assert seen == [[("a", 0), ("b", 0), ("b", 1)]]
        else:
            assert seen == [[("a", 0)], [("b", 0), ("b", 1)]] and [g.step_time for g in got] == [0.5, 0.0]
        assert got[-1].rejected[0].request_id == "c" and box.owner == {}
    finally:
        for p in pulls:
            p.close(linger=0)
        box.close()
        ctx.term()


def test_tokenize_counts_what_the_server_runs(server, client, llm):
    """/tokenize (vLLM's shape) gives the ids a completion or a chat (with tools) would run, /detokenize turns ids
    back into text, /version names the release; bad bodies are 400s naming the field."""
    import slipstream

    url = server.url
    prompt = "The capital of France is"
    t = httpx.post(url + "/tokenize", json={"prompt": prompt, "return_token_strs": True}).json()
    run = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert t["tokens"] == llm.engine.tokenize(prompt) and t["count"] == run.usage.prompt_tokens
    assert t["max_model_len"] == 512 and len(t["token_strs"]) == t["count"]
    bare = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": prompt, "add_special_tokens": False}).json()
    assert httpx.post(url + "/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": prompt}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    counts = []
    for extra in ({}, {"tools": tools}, {"tools": tools, "tool_choice": "none"}):
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0, **extra)
        counts.append(httpx.post(url + "/tokenize", json={"messages": messages, **extra}).json()["count"])
        assert counts[-1] == chat.usage.prompt_tokens, extra
    assert counts[1] > counts[0] == counts[2]  # the tools are in the prompt, unless tool_choice is "none"
    without = httpx.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert 0 < without["count"] < counts[0]
    assert httpx.get(url + "/version").json() == {"version": slipstream.__version__}
    for path, body, param in (("/tokenize", {"prompt": "a", "messages": messages}, "prompt"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"messages": messages, "add_special_tokens": True}, "add_special_tokens"),
                              ("/tokenize", {"prompt": "a", "tools": tools}, "tools"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
                              ("/detokenize", {"tokens": [1, 10 ** 7]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens")):
        r = httpx.post(url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)


def test_bench_serve_reads_the_servers_tokenizer(server, capsys, tmp_path):
    """`slipstream bench serve` with no --tokenizer: the server names where its model came from (`root` in /v1/models,
    here the embedded GGUF file), and the benchmark counts lengths with that file's tokenizer. A run saved with --json
    gives another run each prompt's output length (--output-lens-from): the same work."""
    import argparse

    from slipstream.bench import serve_bench

    root = httpx.get(server.url + "/v1/models").json()["data"][0]["root"]
    assert root.endswith(".gguf")
    args = argparse.Namespace(base_url=server.url, model=None, tokenizer=None, dataset="random", num_prompts=3,
                              random_input_len=8, random_output_len=4, request_rate=[float("inf")], max_concurrency=None,
                              slo_ttft_ms=1000.0, slo_tpot_ms=50.0, seed=0, structured="none", label="", plot=None,
                              output_lens_from=None)
    (r,) = serve_bench.run(args)
    assert r["completed"] == 3 and r["failed"] == 0 and "3 prompts, random" in capsys.readouterr().out
    assert len(r["output_lens"]) == 3 and all(n >= 1 for n in r["output_lens"])
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"results": [{**r, "output_lens": [2, 3, None]}]}))
    (again,) = serve_bench.run(argparse.Namespace(**{**vars(args), "output_lens_from": str(saved)}))
    assert again["output_lens"] == [2, 3, r["output_lens"][2]]  # (a prompt that failed there keeps its own length)
    with pytest.raises(ValueError, match="--output-lens-from"):
        serve_bench.run(argparse.Namespace(**{**vars(args), "num_prompts": 2, "output_lens_from": str(saved)}))
    with pytest.raises(ValueError, match="--tokenizer"):
        serve_bench.run(argparse.Namespace(**{**vars(args), "tokenizer": "/no/such/dir"}))
