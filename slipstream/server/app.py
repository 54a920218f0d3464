"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, and vLLM's
/tokenize, /detokenize and /version.

This is the API front end. It validates, tokenizes (off the event loop), and turns the engine core's token
deltas into text and SSE chunks; the core runs in its own process (`CoreProcess`) or, for tests that hold a
loaded engine, on a thread (`CoreThread`), behind the same ZeroMQ sockets either way.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib
import itertools
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import slipstream
from slipstream.engine.input_processor import EngineOverloaded, apply_chat_template
from slipstream.engine.outputs import CompletionOutput, RequestOutput
from slipstream.heap import freeze_startup_heap, thaw_startup_heap
from slipstream.server.core_client import (AsyncEngineClient, CoreAttached, CoreProcess, CoreThread, EngineDeadError,
                                           new_request_id)
from slipstream.server.metrics import ServerMetrics
from slipstream.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                       describe)
from slipstream.server.tools import (ReasoningStream, ToolStream, detect_format, finished_calls, reasoning_end_ids,
                                     render_messages, split_reasoning, template_renders_tools)
from slipstream.sampling_params import SamplingParams

log = logging.getLogger("slipstream.server")


@dataclass(frozen=True)
class ServerOptions:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 32 << 20  # request bodies larger than this are refused (413) before parsing
    request_timeout: float | None = None  # seconds; a request still running then is aborted (per-request `timeout` may lower it)
    metrics_without_key: bool = False  # with an API key, /metrics needs it too unless this is set
    tool_call_parser: str = "auto"  # how the model writes tool calls (server/tools.py); auto: from the chat template
    reasoning_parser: str = "none"  # how a reasoning model marks its reasoning (server/tools.py), sent as reasoning_content
    tokenizer: str | None = None  # where the front ends' tokenizer is, if not with the model (--tokenizer, as the core's)

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class RequestTimeout(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


def _bad_value(e: ValueError, default_param: str | None = None, prompt_param: str = "prompt") -> ApiError:
    """A refusal naming its field. `prompt_param`: the field the prompt came from (a chat's prompt is its messages)."""
    msg = str(e)
    first = msg.split(" ", 1)[0]
    param = first if first.isidentifier() and first not in ("prompt", "the") else default_param
    if first == "prompt" or "max_model_len" in msg:
        param = prompt_param if first == "prompt" or param is None else param
    return ApiError(400, msg, param=param)


class ServerState:
    """What the handlers need; `client` is None until the core is ready (then /health says 200)."""

    def __init__(self, options: ServerOptions, metrics_dir: str | None = None) -> None:
        self.options = options
        self.client: AsyncEngineClient | None = None
        self.runner: CoreProcess | CoreAttached | CoreThread | None = None  # the core, from the moment it starts
        self.metrics = ServerMetrics(options.model_name, metrics_dir)
        self.load_error: BaseException | None = None
        self.shutting_down = False

    def ready(self) -> AsyncEngineClient:
        if self.client is None:
            msg = "the model is still loading" if self.load_error is None else f"the server failed to start: {self.load_error}"
            raise ApiError(503, msg, "service_unavailable", headers={"Retry-After": "5"})
        if not self.client.alive:
            raise ApiError(503, f"the engine has stopped: {self.client.error}", "service_unavailable")
        return self.client


class _Guard:
    """Pure ASGI middleware (it leaves `Request.is_disconnected` working): API key on every path but /health,
    JSON-only POST bodies (no cross-site form posts), and a request-body size limit."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        opts = self.state.options
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        public = path == "/health" or (path == "/metrics" and opts.metrics_without_key)
        if opts.api_key and not public:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
                err = ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                err = ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
                return await err.response()(scope, receive, send)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > opts.max_request_bytes:
                return await self._too_large()(scope, receive, send)
            receive = self._limited(receive)
        return await self.app(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return ApiError(413, f"request body exceeds {self.state.options.max_request_bytes} bytes").response()

    def _limited(self, receive: Callable) -> Callable:
        seen = 0
        limit = self.state.options.max_request_bytes

        async def wrapped() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes")
            return msg

        return wrapped


def build_app(options: ServerOptions, core: Any = None, config: Any = None, tokenizer: Callable[[], Any] | None = None,
              on_dead: Callable[[BaseException], None] | None = None, log_level: str = "info",
              freeze_heap: bool = False, attach: CoreAttached | None = None, metrics_dir: str | None = None,
              url: str | None = None) -> FastAPI:
    """Serve an already loaded `core` (EngineCore, on a thread), start one in its own process from `config`, or
    `attach` to one that another process started (one of several front ends); the tokenizer, from `tokenizer()`,
    loads meanwhile; /health is 503 until both are ready. `on_dead` is called if the core fails or dies (the CLI
    then exits non-zero). `freeze_heap`: this process is the server's own (`slipstream serve`): once ready, take its
    start-up heap out of garbage collection (slipstream/heap.py). `metrics_dir`: the front ends' shared metrics
    (server/metrics.py). `url`: where this server listens, said once it is ready."""
    state = ServerState(options, metrics_dir)

    def dead(error: BaseException) -> None:
        if on_dead is not None:
            on_dead(error)

    async def boot() -> None:
        try:
            if core is not None:
                runner, load = CoreThread(core), lambda: core.tokenizer
            else:
                runner = state.runner = attach if attach is not None else CoreProcess(config, log_level)

                def load() -> Any:
                    tok = tokenizer()
                    # the grammar service (xgrammar, torch: seconds) imports now, while the core loads, not on the
                    # event loop when the first constrained request arrives; after the tokenizer, not beside it: two
                    # threads importing transformers at once break its lazy imports
                    importlib.import_module("slipstream.grammar")
                    return tok

            client = AsyncEngineClient(runner, on_step=state.metrics.on_step, on_dead=dead)
            await client.start(load)
            state.client = client
            if freeze_heap:
                log.debug("%d start-up objects frozen out of garbage collection", freeze_startup_heap())
            if url is None:
                log.info("engine ready: %s", options.model_name)
            else:
                log.info("ready: %s on %s (OpenAI API at %s/v1)", options.model_name, url, url)
        except asyncio.CancelledError:  # the server stops while it starts
            raise
        except BaseException as e:  # noqa: BLE001 - reported by /health and every request, then the server exits
            log.critical("the server failed to start: %s", e)  # (the core's own message says what failed)
            state.load_error = e
            dead(e)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(boot())
        yield
        task.cancel()
        if state.client is not None:
            state.client.accepting = False
            await state.client.stop()
        elif state.runner is not None and state.runner.owned:  # stopped while loading: a loading core reads no
            state.runner.join(0)  # Shutdown, and it ignores Ctrl-C (server/launch.py): kill it
        if freeze_heap:
            thaw_startup_heap()

    app = FastAPI(title="slipstream", lifespan=lifespan)
    app.state.slipstream = state
    app.add_middleware(_Guard, state=state)

    def begin_shutdown(grace: float) -> None:
        """SIGTERM: stop admitting now; whatever still runs after `grace` seconds ends with an error event."""
        state.shutting_down = True
        if state.client is not None:
            state.client.accepting = False
            asyncio.get_running_loop().call_later(grace, state.client.fail_all, ShuttingDown("the server is shutting down"))

    app.state.begin_shutdown = begin_shutdown

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return ApiError(500, "internal server error", "internal_error").response()

    @app.get("/health")
    async def health() -> Response:
        ok = state.client is not None and state.client.alive and not state.shutting_down
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        card = {"id": options.model_name, "object": "model", "created": 0, "owned_by": "slipstream"}
        if state.client is not None:  # where the model was loaded from, as vLLM says (a benchmark reads its tokenizer)
            card["root"] = state.client.limits.model_path
        return card

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        card = model_card()
        if model_id not in (card["id"], card.get("root")):  # (the served name, or the path it was loaded from)
            raise ApiError(404, f"The model `{model_id}` does not exist.", "invalid_request_error", param="model",
                           code="model_not_found")
        return card

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(raw: Request) -> Response:
        req = await _parse(raw, CompletionRequest)
        client = _check_model(state, req.model)
        prompts = _prompt_list(req.prompt)
        ids = [await _off_loop(client.inputs.tokenize, p, param="prompt") for p in prompts]
        params = _params(req, req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens come with their logprobs
            params = replace(params, prompt_logprobs=max(req.logprobs, params.prompt_logprobs or 0))
        fmt = _CompletionFormat(client, options.model_name, req, prompts, ids)
        return await _serve(raw, state, client, req, "cmpl", list(zip(prompts, ids)), params, fmt)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat(raw: Request) -> Response:
        req = await _parse(raw, ChatCompletionRequest)
        client = _check_model(state, req.model)
        tok = client.tokenizer
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        tools = req.tool_dicts()
        ids = await _chat_prompt(client, req.messages, req.add_generation_prompt, tools, req.chat_template_kwargs)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _params(req, max_tokens, logprobs)
        so = params.structured_outputs
        if options.reasoning_parser != "none" and so is not None:  # the model reasons freely, then answers constrained
            params = replace(params, structured_outputs=replace(so, start_after_ids=reasoning_end_ids(tok, ids)))
        calls = None
        if tools is not None:  # where calls come from: a format the request fixes, or the model's own
            parser = options.tool_call_parser
            calls = (*(req.tool_mode() or (detect_format(tok.chat_template) if parser == "auto" else parser, None)), tools,
                     req.parallel_tool_calls)
            if calls[0] in ("mistral", "glm45"):  # their markers are special tokens: keep them in the text
                params = replace(params, skip_special_tokens=False)
        fmt = _ChatFormat(client, options.model_name, req, calls, options.reasoning_parser)
        return await _serve(raw, state, client, req, "chatcmpl", [(None, ids)], params, fmt)

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize(raw: Request) -> dict[str, Any]:
        """The token ids the server would run for this completion prompt or chat (to count them before sending)."""
        req = await _parse(raw, TokenizeRequest)
        client = _check_model(state, req.model)
        if req.messages is not None:
            ids = await _chat_prompt(client, req.messages, req.add_generation_prompt, req.tool_dicts(),
                                     req.chat_template_kwargs)
        else:
            special = req.add_special_tokens is not False
            ids = await _off_loop(client.inputs.tokenize, req.prompt, special, param="prompt")
        body: dict[str, Any] = {"count": len(ids), "max_model_len": client.limits.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = client.tokenizer.convert_ids_to_tokens(ids)
        return body

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(raw: Request) -> dict[str, Any]:
        req = await _parse(raw, DetokenizeRequest)
        client = _check_model(state, req.model)
        vocab = client.limits.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise ApiError(400, f"tokens must be ids in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": await _off_loop(client.tokenizer.decode, req.tokens, param="tokens")}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": slipstream.__version__}

    return app


async def _chat_prompt(client: AsyncEngineClient, messages: list[Any], add_generation_prompt: bool,
                       tools: list[dict[str, Any]] | None, template_kwargs: dict[str, Any] | None) -> list[int]:
    """A chat's prompt ids: its messages (with the tools, where the template renders them, else in a system message)
    through the model's chat template, off the event loop."""
    tok = client.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ApiError(400, "this model has no chat template", param="messages")
    renders = tools is not None and template_renders_tools(tok.chat_template)
    msgs = render_messages([m.for_template() for m in messages], tools, renders)
    chars = sum(len(m["content"]) for m in msgs)
    limit = client.limits.max_model_len
    if chars > limit * client.inputs.max_token_chars:
        raise ApiError(400, f"messages hold {chars} characters, more than max_model_len={limit} tokens can hold", param="messages")
    return await _off_loop(apply_chat_template, tok, msgs, add_generation_prompt, tools if renders else None,
                           template_kwargs, param="messages")


class _ReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus deadlines for reading each request: its headers within `header_timeout` (from
    the connection's opening, or from a kept-alive connection's first byte of its next request) and its body within
    `body_timeout` after them. A connection that misses one (a slow-loris client) is closed instead of held open:
    uvicorn's own keep-alive timeout only runs while a connection is idle between requests, and stops at its first
    byte."""

    header_timeout = 10.0
    body_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_timer: asyncio.TimerHandle | None = None
        self._body_pending = False  # a request's headers are in, its body not yet
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._body_pending = True
        if self.pipeline:  # queued behind a response still streaming: the client cannot send more until it ends
            self._disarm()
        else:
            self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        self._body_pending = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_pending and self._read_timer is None and not self.transport.is_closing():
            self._arm(self.body_timeout)  # the queued request now runs: its body's deadline starts

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._overdue)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _overdue(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # a handler reading the body sees the client gone


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info", grace_period: float = 30.0,
                   header_timeout: float = 10.0, body_timeout: float = 30.0) -> uvicorn.Config:
    """The ASGI server's settings, one place for the CLI and the tests."""
    if header_timeout <= 0 or body_timeout <= 0:
        raise ValueError(f"header_timeout and body_timeout must be > 0 seconds, got {header_timeout} and {body_timeout}")
    protocol = type("HttpProtocol", (_ReadTimeoutProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, timeout_keep_alive=5,
                          timeout_graceful_shutdown=grace_period)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Describe the JSON body in /openapi.json (the handlers parse it themselves, strictly)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# ---- request handling ----
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _parse(raw: Request, model: type[BaseModel]) -> Any:
    try:
        body = json.loads(await raw.body(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except ClientDisconnect:  # gone before its body was whole: nobody to answer, nothing went wrong here
        raise ApiError(400, "the client disconnected before sending the whole request body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = describe(e)
        raise ApiError(400, message, param=param) from None


def _check_model(state: ServerState, model: str | None) -> AsyncEngineClient:
    client = state.ready()
    if model is not None and model not in (state.options.model_name, client.limits.model_path):
        raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error", param="model", code="model_not_found")
    return client


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


async def _off_loop(fn: Callable, *args: Any, param: str) -> Any:
    """Tokenize on a worker thread: a long prompt must not stall the event loop (and every other stream)."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def _params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise _bad_value(e) from None


async def _serve(raw: Request, state: ServerState, client: AsyncEngineClient, req: Any, kind: str,
                 prompts: list[tuple[str | None, list[int]]], params: SamplingParams, fmt: "_Format") -> Response:
    base = new_request_id(kind)
    prompt_param = "messages" if kind == "chatcmpl" else "prompt"
    streams: list[AsyncIterator[RequestOutput]] = []
    rids = [f"{base}-{i}" for i in range(len(prompts))]
    try:
        for rid, (text, ids) in zip(rids, prompts):
            streams.append(client.generate(rid, text, ids, params, req.priority, stream=req.stream))
    except (ValueError, EngineOverloaded, EngineDeadError) as e:
        for rid in rids[: len(streams)]:
            client.abort(rid)
        raise _admission_error(e, prompt_param) from None
    timeout = min((t for t in (req.timeout, state.options.request_timeout) if t is not None), default=None)
    if req.stream:
        so = req.stream_options
        usage_mode = 2 if so and so.continuous_usage_stats else 1 if so and so.include_usage else 0
        return StreamingResponse(_sse(base, streams, fmt, params.n, usage_mode, timeout), media_type="text/event-stream")
    try:
        finals = await _until_disconnect(raw, _collect(streams), timeout)
    except (ValueError, EngineOverloaded, EngineDeadError, ShuttingDown, RequestTimeout) as e:
        raise _admission_error(e, prompt_param) from None
    if finals is None:
        return Response(status_code=499)  # the client is gone; its requests were aborted
    return Response(orjson.dumps(fmt.full(base, finals, params.n)), media_type="application/json")


def _admission_error(e: BaseException, prompt_param: str = "prompt") -> ApiError:
    if isinstance(e, EngineOverloaded):
        return ApiError(503, f"server overloaded: {e}", "service_unavailable", headers={"Retry-After": "1"})
    if isinstance(e, (EngineDeadError, ShuttingDown)):
        return ApiError(503, str(e), "service_unavailable")
    if isinstance(e, RequestTimeout):
        return ApiError(408, str(e), "timeout", code="request_timeout")
    return _bad_value(e, "max_tokens", prompt_param)  # type: ignore[arg-type]


async def _collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    async def last(s: AsyncIterator[RequestOutput]) -> RequestOutput:
        out = None
        async for out in s:
            pass
        return out

    return list(await asyncio.gather(*(last(s) for s in streams)))


async def _until_disconnect(raw: Request, coro: Awaitable, timeout: float | None) -> Any:
    """Await `coro`, cancelling it (which aborts its requests) if the client disconnects or time runs out. The body
    is read, so the next ASGI message is the disconnect: wait for it (a non-blocking `is_disconnected` poll
    never saw it here)."""
    task = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            return None
        raise RequestTimeout(f"the request did not finish within {timeout} s")
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come; closing the merge closes (aborts) them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await q.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    live = len(tasks)
    try:
        while live:
            i, item = await q.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _timed(agen: AsyncIterator, timeout: float | None) -> AsyncIterator:
    if timeout is None:
        async for x in agen:
            yield x
        return
    deadline = time.monotonic() + timeout
    it = agen.__aiter__()
    while True:
        try:
            x = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request did not finish within {timeout} s") from None
        yield x


# JSON carries U+0085, U+2028 and U+2029 raw, and SSE ends lines only at CR and LF; but Python's str.splitlines
# (httpx's aiter_lines, for one) also breaks lines at these three. Escaped, a client that splits events that way
# still reads each one whole.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _sse_event(obj: Any) -> bytes:
    data = orjson.dumps(obj)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


async def _sse(base: str, streams: list[AsyncIterator[RequestOutput]], fmt: "_Format", n: int, usage_mode: int,
               timeout: float | None) -> AsyncIterator[bytes]:
    """usage_mode: 0 none, 1 a final usage chunk, 2 usage so far in every chunk as well."""
    usage = _Usage()
    merged = _merge(streams)
    try:
        async for i, out in _timed(merged, timeout):
            ended = usage.ended.setdefault(i, set())
            for o in out.outputs:
                if o.index in ended:  # (every report holds each sample; one that ended has said so)
                    continue
                if o.finished:
                    ended.add(o.index)
                chunk = fmt.chunk(base, i * n + o.index, o, o.index not in usage.started.setdefault(i, set()), out)
                usage.started[i].add(o.index)
                if chunk is not None:
                    if usage_mode == 2:
                        chunk["usage"] = usage.so_far(i, out)
                    yield _sse_event(chunk)
            if out.finished:
                usage.add(i, out)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, never a traceback
        if not isinstance(e, (EngineDeadError, ShuttingDown, RequestTimeout, EngineOverloaded, ValueError)):
            log.exception("stream failed")
        yield _sse_event(_admission_error(e).body())
    finally:
        await merged.aclose()
    if usage_mode:
        yield _sse_event(fmt.envelope(base, [], usage.as_dict()))
    yield b"data: [DONE]\n\n"


class _Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = 0
        self.started: dict[int, set[int]] = {}  # per prompt, the samples whose first chunk went out
        self.ended: dict[int, set[int]] = {}  # and those whose last did

    def add(self, i: int, out: RequestOutput) -> None:
        self.prompt += len(out.prompt_token_ids)
        self.completion += sum(o.num_tokens for o in out.outputs)

    def so_far(self, i: int, out: RequestOutput) -> dict[str, int]:
        p = self.prompt + len(out.prompt_token_ids)
        c = self.completion + sum(o.num_tokens for o in out.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion}


# ---- response formats ----
class _Format:
    object_full = object_chunk = ""

    def __init__(self, client: AsyncEngineClient, model_name: str, req: Any) -> None:
        self.tok = client.tokenizer
        self.model = model_name
        self.created = int(time.time())
        self.num_top = (req.logprobs if isinstance(req, CompletionRequest) else req.top_logprobs) or 0
        self.scored = req.prompt_logprobs is not None  # vLLM's prompt_logprobs in the response

    def envelope(self, base: str, choices: list[dict], usage: dict | None = None, full: bool = False) -> dict[str, Any]:
        body = {"id": base, "object": self.object_full if full else self.object_chunk, "created": self.created,
                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def full(self, base: str, finals: list[RequestOutput], n: int) -> dict[str, Any]:
        usage = _Usage()
        choices = []
        for i, out in enumerate(finals):
            usage.add(i, out)
            choices += [self.choice(i * n + o.index, o, out) for o in out.outputs]
        return self.envelope(base, choices, usage.as_dict(), full=True)

    def token_text(self, t: int) -> str:
        return self.tok.decode([t])

    def top(self, lp: dict[int, float]) -> list[tuple[int, float]]:
        """The n most likely alternatives (the per-token dict also holds the sampled token)."""
        return sorted(lp.items(), key=lambda kv: -kv[1])[: self.num_top]

    def prompt_logprobs(self, out: RequestOutput) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, then {token id: {logprob, rank,
        decoded_token}} for the prompt token and the k most likely there."""
        if out.prompt_logprobs is None:
            return None
        result: list[dict[str, dict[str, Any]] | None] = [None]
        for rank, entry in out.prompt_logprobs[1:]:
            target = next(iter(entry))
            ordered = sorted(entry.items(), key=lambda kv: -kv[1])
            result.append({str(t): {"logprob": lp, "rank": rank if t == target else i + 1, "decoded_token": self.token_text(t)}
                           for i, (t, lp) in enumerate(ordered)})
        return result


class _CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def __init__(self, client: AsyncEngineClient, model_name: str, req: CompletionRequest, prompts: list, ids: list[list[int]]) -> None:
        super().__init__(client, model_name, req)
        self.echo = req.echo
        self.prompt_texts = [p if isinstance(p, str) else self.tok.decode(i) for p, i in zip(prompts, ids)] if req.echo else []
        self.n = req.n
        self.echo_logprobs = req.echo and req.logprobs is not None  # the prompt's tokens lead the logprobs
        self._prompt_parts: dict[str, tuple[dict[str, list], int]] = {}

    def _prompt_part(self, out: RequestOutput) -> tuple[dict[str, list], int]:
        """The legacy logprobs of an echoed prompt (its tokens, each one's logprob, None for the first, and top n),
        and where the output's offsets start; once per request (its n choices share it)."""
        part = self._prompt_parts.get(out.request_id)
        if part is None:
            ids, scores = out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            texts = [self.token_text(t) for t in ids]
            offsets = list(itertools.accumulate((len(t) for t in texts), initial=0))
            part = self._prompt_parts[out.request_id] = ({
                "tokens": texts, "token_logprobs": [None if s is None else s[1][t] for t, s in zip(ids, scores)],
                "top_logprobs": [None if s is None else dict((self.token_text(k), v) for k, v in self.top(s[1])) or None
                                 for s in scores],
                "text_offset": offsets[:-1]}, offsets[-1])
        return part

    def _with_prompt(self, index: int, out: RequestOutput, toks: list[int], lps: list[dict[int, float]] | None,
                     offset: int, echoed: bool) -> dict | None:
        """The choice's logprobs, offsets counted in the echoed text too; an echoed prompt's own logprobs lead them
        when `echoed`."""
        lead = len(self.prompt_texts[index // self.n]) if self.echo else 0
        if self.echo_logprobs:  # the prompt's token texts may spell more than the prompt (a BOS): offsets only grow
            lead = max(lead, self._prompt_part(out)[1])
        gen = self.logprobs(toks, lps, lead + offset)
        if not (echoed and self.echo_logprobs) or gen is None:
            return gen
        prompt = self._prompt_part(out)[0]
        return {k: prompt[k] + gen[k] for k in gen}

    def logprobs(self, toks: list[int], lps: list[dict[int, float]] | None, offset: int) -> dict | None:
        if lps is None:
            return None
        texts = [self.token_text(t) for t in toks]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": texts, "token_logprobs": [lp[t] for t, lp in zip(toks, lps)],
                "top_logprobs": [dict((self.token_text(k), v) for k, v in self.top(lp)) or None for lp in lps],
                "text_offset": offsets}

    def choice(self, index: int, o: CompletionOutput, out: RequestOutput) -> dict[str, Any]:
        text = (self.prompt_texts[index // self.n] if self.echo else "") + o.text
        c = {"index": index, "text": text, "logprobs": self._with_prompt(index, out, o.token_ids, o.logprobs, 0, True),
             "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        if self.scored:
            c["prompt_logprobs"] = self.prompt_logprobs(out)
        return c

    def chunk(self, base: str, index: int, o: CompletionOutput, first: bool, out: RequestOutput) -> dict | None:
        text = (self.prompt_texts[index // self.n] if self.echo and first else "") + o.delta_text
        if not text and not o.finished and not o.delta_token_ids:
            return None
        logprobs = self._with_prompt(index, out, o.delta_token_ids, o.delta_logprobs, len(o.text) - len(o.delta_text), first)
        c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        if self.scored and first:
            c["prompt_logprobs"] = self.prompt_logprobs(out)
        return self.envelope(base, [c])


class _ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, client: AsyncEngineClient, model_name: str, req: Any,
                 calls: tuple[str, str | None, list[dict]] | None,
                 reasoning: str = "none") -> None:
        super().__init__(client, model_name, req)
        self.calls = calls  # (tool call format, the named function, the tools, parallel calls) when the request has tools
        self.reasoning = reasoning  # how the model marks its reasoning (server/tools.py), "none": it does not
        self.streams: dict[int, tuple[ReasoningStream, ToolStream]] = {}

    def full(self, base: str, finals: list[RequestOutput], n: int) -> dict[str, Any]:
        body = super().full(base, finals, n)
        if self.scored:  # one conversation, one prompt: beside the choices, as vLLM puts it
            body["prompt_logprobs"] = self.prompt_logprobs(finals[0])
        return body

    def _finish_reason(self, o: CompletionOutput, called: bool, complete: bool) -> str | None:
        # OpenAI: a forced call "stop"s; a call cut off keeps the output's reason ("length": max_tokens)
        if called and complete and o.finish_reason == "stop" and self.calls[0] != "named":
            return "tool_calls"
        return o.finish_reason

    def logprobs(self, toks: list[int], lps: list[dict[int, float]] | None) -> dict | None:
        if lps is None:
            return None

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in self.top(lp)]} for t, lp in zip(toks, lps)]}

    def choice(self, index: int, o: CompletionOutput, out: RequestOutput) -> dict[str, Any]:
        text = o.text
        message: dict[str, Any] = {"role": "assistant"}
        if self.reasoning != "none":
            reasoning, text = split_reasoning(self.reasoning, text, True)
            message["reasoning_content"] = reasoning or None
        message["content"] = text
        found = finished_calls(self.calls[0], text, *self.calls[1:]) if self.calls else None
        if found is not None:
            message["content"], message["tool_calls"], _ = found
        return {"index": index, "message": message, "logprobs": self.logprobs(o.token_ids, o.logprobs),
                "finish_reason": self._finish_reason(o, found is not None, found is None or found[2]),
                "stop_reason": o.stop_reason}

    def chunk(self, base: str, index: int, o: CompletionOutput, first: bool, out: RequestOutput) -> dict | None:
        if not o.delta_text and not o.finished and not first and not o.delta_token_ids:
            return None
        delta: dict[str, Any] = {"content": o.delta_text}
        reason = o.finish_reason
        if self.calls or self.reasoning != "none":  # re-read the text so far: reasoning, content, calls; each sent once
            thinking, stream = self.streams.setdefault(index, (ReasoningStream(self.reasoning), ToolStream(*(self.calls or ("text", None)))))
            reasoning, text = thinking.feed(o.text, o.finished) if self.reasoning != "none" else ("", o.text)
            content, calls = stream.feed(text, o.finished)
            # a token inside a call, or held back, says nothing: no chunk (unless it carries logprobs)
            delta = {"content": content} if content or (first and not (calls or reasoning)) else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if calls:
                delta["tool_calls"] = calls
            reason = self._finish_reason(o, stream.called, stream.complete)
            if not delta and not o.finished and not first and o.delta_logprobs is None:
                return None
        if first:
            delta["role"] = "assistant"
        c = {"index": index, "delta": delta, "logprobs": self.logprobs(o.delta_token_ids, o.delta_logprobs),
             "finish_reason": reason, "stop_reason": o.stop_reason}
        return self.envelope(base, [c])
