"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from slipstream.engine.llm_engine import EngineOverloaded, LLMEngine
from slipstream.engine.outputs import CompletionOutput, RequestOutput
from slipstream.server.async_engine import AsyncEngine, EngineDeadError
from slipstream.server.metrics import ServerMetrics
from slipstream.server.protocol import ChatCompletionRequest, CompletionRequest
from slipstream.sampling_params import SamplingParams

log = logging.getLogger("slipstream.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad_value(e: ValueError, default_param: str | None = None) -> ApiError:
    msg = str(e)
    first = msg.split(" ", 1)[0]
    param = first if first.isidentifier() and first not in ("prompt", "the") else default_param
    if first == "prompt" or "max_model_len" in msg:
        param = param or "prompt"
    return ApiError(400, msg, param=param)


class ServerState:
    """What the handlers need; `engine` is None until loading finishes (then /health says 200)."""

    def __init__(self, model_name: str, api_key: str | None) -> None:
        self.model_name, self.api_key = model_name, api_key
        self.engine: AsyncEngine | None = None
        self.metrics: ServerMetrics | None = None
        self.load_error: BaseException | None = None

    def attach(self, engine: LLMEngine) -> None:
        self.metrics = ServerMetrics(engine, self.model_name)
        self.engine = AsyncEngine(engine, on_step=self.metrics.on_step)

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            raise ApiError(503, "the model is still loading" if self.load_error is None else f"the model failed to load: {self.load_error}",
                           "service_unavailable", headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise ApiError(503, "the engine loop has stopped", "service_unavailable")
        return self.engine


def build_app(model_name: str, api_key: str | None = None, engine: LLMEngine | None = None,
              load: Callable[[], LLMEngine] | None = None) -> FastAPI:
    """Serve `engine`, or one built by `load` on a background thread at startup (health is 503 meanwhile)."""
    state = ServerState(model_name, api_key)
    if engine is not None:
        state.attach(engine)

    def load_in_background() -> None:
        try:
            engine = load()
            engine.warm_up()
            state.attach(engine)
        except BaseException as e:  # noqa: BLE001 - reported by /health and every request
            log.exception("model load failed")
            state.load_error = e

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load is not None and state.engine is None:
            threading.Thread(target=load_in_background, daemon=True).start()
        yield
        if state.engine is not None:  # graceful shutdown: uvicorn has drained connections by now
            state.engine.accepting = False
            state.engine.stop()

    app = FastAPI(title="slipstream", lifespan=lifespan)
    app.state.slipstream = state

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return ApiError(500, "internal server error", "internal_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN202
        if state.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        ok = state.engine is not None and state.engine.alive and state.engine.accepting
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return Response(status_code=503)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "slipstream"}]}

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        req = await _parse(raw, CompletionRequest)
        eng = _check_model_and_engine(state, req.model)
        prompts = _prompt_list(req.prompt)
        ids = [_tokenize(eng.engine, p) for p in prompts]
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        params = _params(req, req.max_tokens, req.logprobs, None)
        return await _serve(raw, state, eng, req, "cmpl", ids, params, _CompletionFormat(eng, req, prompts, ids))

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Response:
        req = await _parse(raw, ChatCompletionRequest)
        eng = _check_model_and_engine(state, req.model)
        tok = eng.engine.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ApiError(400, "this model has no chat template", param="messages")
        try:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = tok.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _params(req, max_tokens, logprobs, None)
        return await _serve(raw, state, eng, req, "chatcmpl", [ids], params, _ChatFormat(eng, req))

    return app


# ---- request handling ----
async def _parse(raw: Request, model: type[BaseModel]) -> Any:
    try:
        body = json.loads(await raw.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}", param=str(err["loc"][0]) if err["loc"] else None) from None


def _check_model_and_engine(state: ServerState, model: str | None) -> AsyncEngine:
    eng = state.ready()
    if model is not None and model not in (state.model_name, eng.engine.model_path):
        raise ApiError(404, f"The model `{model}` does not exist.", "invalid_request_error", param="model", code="model_not_found")
    return eng


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


def _tokenize(engine: LLMEngine, prompt: str | list[int]) -> list[int]:
    try:
        return engine.tokenize(prompt)
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None


def _params(req: Any, max_tokens: int | None, logprobs: int | None, default_max: int | None) -> SamplingParams:
    try:
        return req.sampling_params(max_tokens, logprobs, default_max)
    except ValueError as e:
        raise _bad_value(e) from None


async def _serve(raw: Request, state: ServerState, eng: AsyncEngine, req: Any, kind: str, prompts: list[list[int]],
                 params: SamplingParams, fmt: "_Format") -> Response:
    base = f"{kind}-{uuid.uuid4().hex}"
    streams: list[AsyncIterator[RequestOutput]] = []
    rids = [f"{base}-{i}" for i in range(len(prompts))]
    try:
        for rid, ids in zip(rids, prompts):
            streams.append(eng.generate(rid, ids, params, req.priority))
    except (ValueError, EngineOverloaded, EngineDeadError) as e:
        for rid in rids[: len(streams)]:
            eng.abort(rid)
        if isinstance(e, EngineOverloaded):
            raise ApiError(503, f"server overloaded: {e}", "service_unavailable", headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineDeadError):
            raise ApiError(503, str(e), "service_unavailable") from None
        raise _bad_value(e, "max_tokens") from None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(base, streams, fmt, params.n, include_usage), media_type="text/event-stream")
    finals = await _until_disconnect(raw, _collect(streams))
    if finals is None:
        return Response(status_code=499)  # the client is gone; its requests were aborted
    return JSONResponse(fmt.full(base, finals, params.n))


async def _collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    async def last(s: AsyncIterator[RequestOutput]) -> RequestOutput:
        out = None
        async for out in s:
            pass
        return out

    return list(await asyncio.gather(*(last(s) for s in streams)))


async def _until_disconnect(raw: Request, coro: Any) -> Any:
    """Await `coro`, cancelling it (which aborts its requests) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


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


async def _sse(base: str, streams: list[AsyncIterator[RequestOutput]], fmt: "_Format", n: int, include_usage: bool) -> AsyncIterator[str]:
    usage = _Usage()
    merged = _merge(streams)
    try:
        async for i, out in merged:
            for o in out.outputs:
                chunk = fmt.chunk(base, i * n + o.index, o, first=o.index not in usage.started.setdefault(i, set()))
                usage.started[i].add(o.index)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
            if out.finished:
                usage.add(out)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, never a traceback
        log.exception("stream failed")
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'internal_error', 'param': None, 'code': None}})}\n\n"
    finally:
        await merged.aclose()
    if include_usage:
        yield f"data: {json.dumps(fmt.envelope(base, [], usage.as_dict()))}\n\n"
    yield "data: [DONE]\n\n"


class _Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = 0
        self.started: dict[int, set[int]] = {}

    def add(self, out: RequestOutput) -> None:
        self.prompt += len(out.prompt_token_ids)
        self.completion += sum(len(o.token_ids) for o in out.outputs)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion}


# ---- response formats ----
class _Format:
    object_full = object_chunk = ""

    def __init__(self, eng: AsyncEngine, req: Any) -> None:
        self.tok = eng.engine.tokenizer
        self.model = req.model or eng.engine.model_path
        self.created = int(time.time())
        self.num_top = (req.logprobs if isinstance(req, CompletionRequest) else req.top_logprobs) or 0

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
            usage.add(out)
            choices += [self.choice(i * n + o.index, o, out) for o in out.outputs]
        return self.envelope(base, choices, usage.as_dict(), full=True)

    def token_text(self, t: int) -> str:
        return self.tok.decode([t])

    def top(self, lp: dict[int, float]) -> list[tuple[int, float]]:
        """The n most likely alternatives (the per-token dict also holds the sampled token)."""
        return sorted(lp.items(), key=lambda kv: -kv[1])[: self.num_top]


class _CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def __init__(self, eng: AsyncEngine, req: CompletionRequest, prompts: list, ids: list[list[int]]) -> None:
        super().__init__(eng, req)
        self.echo = req.echo
        self.prompt_texts = [p if isinstance(p, str) else self.tok.decode(i) for p, i in zip(prompts, ids)]
        self.n = req.n

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
        return {"index": index, "text": text, "logprobs": self.logprobs(o.token_ids, o.logprobs, 0),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    def chunk(self, base: str, index: int, o: CompletionOutput, first: bool) -> dict | None:
        text = (self.prompt_texts[index // self.n] if self.echo and first else "") + o.delta_text
        if not text and not o.finished and not o.delta_token_ids:
            return None
        c = {"index": index, "text": text, "logprobs": self.logprobs(o.delta_token_ids, o.delta_logprobs, len(o.text) - len(o.delta_text)),
             "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        return self.envelope(base, [c])


class _ChatFormat(_Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def logprobs(self, toks: list[int], lps: list[dict[int, float]] | None) -> dict | None:
        if lps is None:
            return None

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in self.top(lp)]} for t, lp in zip(toks, lps)]}

    def choice(self, index: int, o: CompletionOutput, out: RequestOutput) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": o.text},
                "logprobs": self.logprobs(o.token_ids, o.logprobs), "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    def chunk(self, base: str, index: int, o: CompletionOutput, first: bool) -> dict | None:
        if not o.delta_text and not o.finished and not first and not o.delta_token_ids:
            return None
        delta: dict[str, Any] = {"content": o.delta_text}
        if first:
            delta["role"] = "assistant"
        c = {"index": index, "delta": delta, "logprobs": self.logprobs(o.delta_token_ids, o.delta_logprobs),
             "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
        return self.envelope(base, [c])
