"""Server hardening: every value a client can send is a 400 or served, never an engine failure; clients that
leave free their work; limits, auth and error shapes. One test (or case) per defect found by probing the server."""
import asyncio
import json
import re
import logging
import socket
import time

import httpx
import pytest

from server_util import LiveServer
from slipstream import LLM

MODEL = "smollm2"


@pytest.fixture(scope="module")
def llm(gguf_path):
    """Its own engine: a request left running by a failing test here must not leak into other modules."""
    return LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def server(llm):
    with LiveServer(llm.engine, MODEL, max_request_bytes=1 << 20, header_timeout=1.0, body_timeout=1.0) as s:
        yield s


def post(server, body, path="completions", **kw):
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60, **kw)


def metric(server, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+-]+)$", httpx.get(server.url + "/metrics").text, re.M)
    return float(m.group(1))


def ok(server) -> None:
    r = post(server, {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


POISON = [  # (body fields, the param the 400 must name)
    ({"seed": 1180591620717411303424}, "seed"),
    ({"top_k": 9223372036854775808}, "top_k"),
    ({"top_k": 10**9}, "top_k"),
    ({"temperature": 1e9}, "temperature"),
    ({"n": 5000}, "n"),
    ({"max_tokens": 1 << 40}, "max_tokens"),
    ({"min_tokens": 1 << 40}, "min_tokens"),
    ({"priority": 1 << 40}, "priority"),
    ({"stop_token_ids": [1 << 40]}, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1e9}}, "logit_bias"),
    ({"repetition_penalty": 1e9}, "repetition_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_regex": "(abc"}, "guided_regex"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"best_of": 3}, "best_of"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"bad_words": ["a"]}, "bad_words"),
    ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}}, "guided_json"),
    ({"timeout": -1}, "timeout"),
]


@pytest.mark.parametrize("fields, param", POISON)
def test_out_of_range_values_are_400_naming_the_field(server, fields, param):
    r = post(server, {"prompt": "hi", "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url + "/health").status_code == 200


def test_largest_seed_with_n_2_is_served(server):
    """Seeds of the whole int64 range work, also when sample i adds its offset (it once overflowed)."""
    r = post(server, {"prompt": "hi", "max_tokens": 3, "seed": (1 << 63) - 1, "n": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    r = post(server, {"prompt": "hi", "max_tokens": 3, "seed": -(1 << 63), "ignore_eos": True})
    assert r.status_code == 200


def test_poison_concurrently_with_normal_traffic(server):
    """Every poison value sent at once beside normal requests: the normal ones get exactly their tokens."""
    expected = post(server, {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            good = [c.post(server.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
                    for _ in range(6)]
            bad = [c.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, **f}) for f, _ in POISON]
            return await asyncio.gather(*good), await asyncio.gather(*bad)

    good, bad = asyncio.run(main())
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == expected for r in good)
    assert all(r.status_code == 400 for r in bad)


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "temperature": Infinity}',
                                 b'{"prompt": "hi", "top_p": -Infinity}'])
def test_non_finite_json_numbers_are_refused(server, raw):
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("content", [[{"type": "text", "text": 123}], [{"type": "text", "text": None}],
                                     [{"type": "image_url", "image_url": {"url": "x"}}], 5])
def test_bad_content_parts_are_400(server, content):
    r = post(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 2}, "chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    ok(server)


def test_text_parts_developer_role_and_max_completion_tokens(server):
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]}]
    r = post(server, {"messages": msgs, "max_completion_tokens": 3, "temperature": 0, "ignore_eos": True,
                      "response_format": {"type": "text"}, "tool_choice": "none", "user": "u1"}, "chat/completions")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_model_field_is_the_served_name(server):
    assert post(server, {"prompt": "hi", "max_tokens": 1}).json()["model"] == MODEL


def test_error_bodies_have_openai_shape(server):
    for r in (httpx.get(server.url + "/v1/nope"), httpx.get(server.url + "/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 100}, "chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_body_size_and_prompt_length_limits(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    start = time.monotonic()
    r = post(server, {"prompt": "word " * 150_000, "max_tokens": 2})  # 750 KB: refused before tokenizing
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and time.monotonic() - start < 5
    r = post(server, {"prompt": "word " * 3000, "max_tokens": 2})  # tokenized, then too long
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.json()
    r = post(server, {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 2}, "chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.json()

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_only_json_bodies(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(server.url + "/v1/completions", data={"prompt": "hi"})  # a cross-site form post
    assert r.status_code == 415


def _leave_and_check_freed(server) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "n": 2}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    deadline = time.time() + 10
    while metric(server, "slipstream:num_requests_running") or metric(server, "slipstream:num_requests_waiting"):
        assert time.time() < deadline, "the request kept running after its client left"
        time.sleep(0.2)
    assert metric(server, "slipstream:kv_cache_free_blocks") == metric(server, "slipstream:kv_cache_total_blocks")


def test_non_streaming_client_that_leaves_frees_its_work(server):
    _leave_and_check_freed(server)


def test_a_client_that_leaves_is_noticed_behind_any_middleware(gguf_path):
    """A user's own Starlette middleware in front (BaseHTTPMiddleware once hid disconnects from the handler)."""
    from starlette.middleware.base import BaseHTTPMiddleware

    async def passthrough(request, call_next):
        return await call_next(request)

    live = LiveServer(LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024).engine, MODEL)
    live.app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    with live as s:
        _leave_and_check_freed(s)


def test_request_deadline(server):
    r = post(server, {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "timeout": 1.0})
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "timeout": 1.0, "stream": True}) as s:
        events = [l for l in s.iter_lines() if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    ok(server)


def test_connection_that_never_finishes_its_headers_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 5


def test_slow_requests_on_a_kept_alive_connection_are_closed(server, caplog):
    """The header deadline holds for every request a connection sends, not only its first, and a body that stalls
    after its headers is cut too (each was held open forever), quietly (it was logged as an internal error)."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    whole = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    for stall in (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # half the next request's headers
                  (whole % (len(body) + 10)) + body):  # whole headers, a body 10 bytes short
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall((whole % len(body)) + body)
            first = b""
            while b"\r\n\r\n" not in first or not first.rstrip().endswith(b"}"):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first[:100]
            s.sendall(stall)
            start = time.monotonic()
            rest = b""
            while chunk := s.recv(65536):  # closed by the server
                rest += chunk
            assert time.monotonic() - start < 5, stall
            assert b"200 OK" not in rest
    time.sleep(0.5)  # (the handler of the cut body ends after the connection)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_continuous_usage_stats(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as s:
        chunks = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 4 and chunks[-1]["usage"]["total_tokens"] > 4


def test_openapi_documents_request_bodies(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    schema = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in schema["properties"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the core's thread raises
def test_an_engine_that_raises_ends_every_stream_and_turns_health_red(gguf_path, caplog):
    """The engine failing inside a step (the shape of the int64 overflow that once killed the loop for good):
    the open stream ends with the error and [DONE], /health turns 503, new requests get 503, and the server is
    told (`on_dead`: the CLI then exits non-zero), and the log holds the traceback."""
    engine = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256).engine
    dead = []
    with LiveServer(engine, MODEL, on_dead=dead.append) as s:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(l for l in lines if l.startswith("data: {"))  # the stream is running

            def broken():
                raise RuntimeError("injected step failure")
            engine.core.step = broken
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "injected step failure" in json.loads(rest[-2][6:])["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 503
        assert len(dead) == 1 and "injected step failure" in str(dead[0])
    assert "Traceback" in caplog.text and "in broken" in caplog.text  # the log keeps where it failed, not a repr


def test_server_wide_request_timeout_and_public_metrics(gguf_path):
    """`--request-timeout` holds for requests that set none; `--metrics-without-key` opens /metrics alone."""
    engine = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256).engine
    with LiveServer(engine, MODEL, request_timeout=1.0) as s:
        r = httpx.post(s.url + "/v1/completions", timeout=60, json={"prompt": "Once", "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    with LiveServer(engine, MODEL, api_key="sekret", metrics_without_key=True) as s:
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401


def test_api_key_guards_everything_but_health(gguf_path):
    # Its own engine: a core is served by one loop at a time, and the module's server holds `llm`'s.
    keyed = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256)
    with LiveServer(keyed.engine, MODEL, api_key="sekret") as s:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert httpx.get(s.url + path).status_code == 401, path
        assert httpx.get(s.url + "/health").status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"{scheme} sekret"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Basic sekret"}).status_code == 401
