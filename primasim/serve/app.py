"""The OpenAI-compatible HTTP API of `primasim serve` (FastAPI on uvicorn, SSE by sse-starlette).

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both streaming by server-sent events with ``stream: true``), and
``GET /v1/primasim/status`` (plan, slots, devices, departures and recoveries).

- Errors are the API's error objects with its statuses (400 bad request, 401 without the API key,
  404 unknown model or route, 413 body too large, 429 queue full, 503 no cluster to serve on).
- Streams send one chunk per generated token (its text may be empty while a multi-byte character
  or a possible stop string is held back), the finish reason in the last chunk, usage with
  ``stream_options.include_usage``, then ``data: [DONE]``. While the engine recovers from a lost
  device, streams get ``: recovering`` comments (clients ignore them); an error mid-stream is a
  ``data: {"error": ...}`` event, which the openai client raises.
- A client that disconnects cancels its request: the engine frees its slot at the next ring turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from primasim.core.errors import PrimasimError

from .engine import Engine, EngineRequest
from .protocol import (
    APIError,
    ChatBody,
    CompletionBody,
    Limits,
    Reply,
    Sampling,
    StopMatcher,
    chat_messages,
    parse,
    sampling,
)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class Served:
    """What the app serves: the engine, the tokenizer, the model's public name and the limits."""

    def __init__(self, engine: Engine, tokenizer: Any, model_id: str, limits: Limits, *, api_key: str | None = None,
                 chat_template: str | None = None, aliases: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.model_id = model_id
        self.names = {model_id, *aliases}
        self.limits = limits
        self.api_key = api_key
        self.chat_template = chat_template
        self.created = int(time.time())


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="primasim serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = "no such route" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc.errors()[0].get("msg", "invalid request"))).body(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if served.api_key and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            want = f"Bearer {served.api_key}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                return JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        st = served.engine.state
        body = {"status": "ok" if st == "ready" else st, **served.engine.counts()}
        if served.engine.error:
            body["error"] = served.engine.error
        return JSONResponse(body, status_code=200 if st == "ready" else 503,
                            headers={} if st == "ready" else {"retry-after": "5"})

    def model_obj() -> dict[str, Any]:
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "primasim"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_obj()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name not in served.names:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_obj()

    @app.get("/v1/primasim/status")
    async def status() -> dict[str, Any]:
        return served.engine.status()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse(CompletionBody, await _json(request, served.limits))
        _check_model(served, body.model)
        ids = _prompt_ids(served, body.prompt)
        return await _generate(request, served, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = parse(ChatBody, await _json(request, served.limits))
        _check_model(served, body.model)
        ids = _chat_ids(served, chat_messages(body))
        return await _generate(request, served, body, ids, chat=True)

    return app


# ------------------------------------------------------------------------------------ requests
async def _json(request: Request, limits: Limits) -> Any:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limits.max_body_bytes:
        raise APIError(413, f"the request body has {n} bytes; this server accepts up to {limits.max_body_bytes}")
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > limits.max_body_bytes:
            raise APIError(413, f"the request body exceeds {limits.max_body_bytes} bytes")
    try:
        return json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not JSON ({exc})") from None


def _check_model(served: Served, name: str) -> None:
    if name not in served.names:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served.model_id!r}",
                       param="model", code="model_not_found")


def _prompt_ids(served: Served, prompt: Any) -> list[int]:
    vocab = served.engine.spec.vocab
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if served.tok is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        ids = served.tok.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
    else:
        raise APIError(400, "prompt: one string or one list of token ids per request (several prompts are not "
                       "supported)", param="prompt")
    if not ids:
        raise APIError(400, "prompt: empty", param="prompt")
    return ids


def _chat_ids(served: Served, messages: list[dict[str, Any]]) -> list[int]:
    if served.tok is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
                       param="messages")
    from primasim.runtime.chat import chat_prompt_ids

    tpl = served.chat_template or getattr(served.tok, "chat_template", None) or CHATML
    try:
        return chat_prompt_ids(served.tok, messages, template=tpl)
    except PrimasimError as exc:
        raise APIError(400, f"messages: {exc.what}", param="messages") from None


# ------------------------------------------------------------------------------------ generation
class _Bridge:
    """Engine-thread events -> this request's asyncio queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, (kind, info))


def _engine_request(served: Served, ids: list[int], s: Sampling, sink: _Bridge) -> EngineRequest:
    stop_ids: tuple[int, ...] = ()
    if not s.ignore_eos and served.tok is not None:
        stop_ids = tuple(served.tok.stop_ids())
    return EngineRequest(ids, s.max_tokens, sink, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                         seed=s.seed, stop_ids=stop_ids, min_tokens=s.min_tokens)


async def _generate(request: Request, served: Served, body: Any, ids: list[int], *, chat: bool) -> Any:
    eng = served.engine
    s = sampling(body, len(ids), served.limits, chat=chat)
    if eng.state in ("failed", "closed"):
        raise APIError(503, f"the server cannot serve: {eng.error or eng.state}", code="unavailable")
    c = eng.counts()
    if c["running"] + c["waiting"] >= served.limits.max_queue:
        raise APIError(429, f"{c['running'] + c['waiting']} requests are in the queue (the limit is "
                       f"{served.limits.max_queue}); retry later", code="queue_full", headers={"retry-after": "1"})
    sink = _Bridge()
    req = _engine_request(served, ids, s, sink)
    reply = Reply(body.model, chat)
    try:
        eng.submit(req)
    except PrimasimError as exc:  # the engine failed between the check above and now
        raise APIError(503, f"the server cannot serve: {exc.what}", code="unavailable") from None
    text = _Text(served.tok, s.stop)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return EventSourceResponse(_stream(served, req, sink, reply, text, len(ids), include_usage), ping=15,
                                   sep="\n")
    return await _whole(request, served, req, sink, reply, text, len(ids))


class _Text:
    """Token ids -> released text: UTF-8 completed across tokens, stop strings cut."""

    def __init__(self, tok: Any, stops: tuple[str, ...]) -> None:
        self.dec = tok.stream() if tok is not None and hasattr(tok, "stream") else None
        self.tok = tok
        self.stop = StopMatcher(stops)
        self.n = 0

    def push(self, tid: int) -> str:
        self.n += 1
        if self.dec is None:
            return ""
        return self.stop.push(self.dec.push(tid))

    def flush(self) -> str:
        tail = self.dec.flush() if self.dec is not None else ""
        return self.stop.push(tail) + self.stop.flush()


def _timings(req: EngineRequest) -> dict[str, Any]:
    t = req.times
    return {"timings": {"received": req.received, "admitted": req.admitted,
                        "queue_ms": None if req.admitted is None else (req.admitted - req.received) * 1e3,
                        "first_token": t[0] if t else None, "restarts": req.restarts}}


async def _stream(served: Served, req: EngineRequest, sink: _Bridge, reply: Reply, text: _Text, n_prompt: int,
                  include_usage: bool) -> AsyncIterator[Any]:
    eng = served.engine
    finished = False
    first = True
    try:
        while True:
            kind, info = await sink.q.get()
            if kind == "token":
                out = text.push(int(info["token_id"]))
                yield json.dumps(reply.chunk(out, None, first=first))
                first = False
                if text.stop.hit:  # a stop string: the request ends here, its slot is freed
                    eng.cancel(req.rid)
                    finished = True
                    yield json.dumps(reply.chunk(None if reply.chat else "", "stop", extra=_timings(req)))
                    break
            elif kind == "recovering":
                yield ServerSentEvent(comment=f"recovering: device {info.get('device')} left, re-planning")
            elif kind == "finish":
                finished = True
                tail = text.flush()
                reason = "stop" if info.get("reason") == "stop" else "length"
                if info.get("reason") == "cancelled":
                    break
                yield json.dumps(reply.chunk(tail if (tail or not reply.chat) else None, reason, first=first,
                                             extra=_timings(req)))
                break
            else:  # error
                finished = True
                yield json.dumps(APIError(503, str(info.get("message", "the server failed")), code="unavailable").body())
                break
        if include_usage:
            yield json.dumps(reply.usage_chunk(n_prompt, text.n))
        yield "[DONE]"
    finally:
        if not finished:  # the client went away (or the server is shutting down): free the slot
            eng.cancel(req.rid)


async def _whole(request: Request, served: Served, req: EngineRequest, sink: _Bridge, reply: Reply, text: _Text,
                 n_prompt: int) -> Any:
    eng = served.engine
    parts: list[str] = []
    reason = "length"
    try:
        while True:
            try:
                kind, info = await asyncio.wait_for(sink.q.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    eng.cancel(req.rid)
                    return JSONResponse(APIError(400, "client disconnected").body(), status_code=400)
                continue
            if kind == "token":
                parts.append(text.push(int(info["token_id"])))
                if text.stop.hit:
                    eng.cancel(req.rid)
                    reason = "stop"
                    break
            elif kind == "finish":
                reason = "stop" if info.get("reason") == "stop" else "length"
                parts.append(text.flush())
                break
            elif kind == "error":
                raise APIError(503, str(info.get("message", "the server failed")), code="unavailable")
    except asyncio.CancelledError:
        eng.cancel(req.rid)
        raise
    return JSONResponse(reply.full("".join(parts), reason, n_prompt, text.n, _timings(req)))
