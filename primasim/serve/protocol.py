"""The OpenAI API's request and response objects, as `primasim serve` accepts and returns them.

Requests are validated into `Sampling` + prompt (text, token ids or chat messages); anything
invalid or unsupported raises `APIError`, which the app turns into the API's error object
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status (400 for a bad
request, not FastAPI's 422, so the openai client raises BadRequestError). Responses are plain
dicts shaped as the openai types (`text_completion`, `chat.completion`, their `.chunk` forms).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error the API reports as an error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------ requests
class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM / llama.cpp extension: generate exactly max_tokens
    min_tokens: int = Field(default=0, ge=0)  # vLLM extension
    user: str | None = None


class CompletionBody(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None


def parse(cls: type[_Base], raw: Any) -> Any:
    """Validate a JSON body into `cls`, or raise a 400 APIError naming the field."""
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if not isinstance(x, int) or True)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            msg = "this field is required"
        raise APIError(400, f"{loc}: {msg}", param=str(err["loc"][0]) if err.get("loc") else None,
                       code="invalid_value") from None


@dataclass(frozen=True)
class Sampling:
    """What the engine needs to generate: lengths, sampler and stops."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    min_tokens: int


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (`primasim serve --max-*`)."""

    n_ctx: int
    max_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    max_stop: int = 4
    default_max_tokens: int = 16  # completions' default, as OpenAI's


def sampling(body: _Base, prompt_len: int, limits: Limits, *, chat: bool) -> Sampling:
    """Check what the engine cannot do and the request's size; return the sampler settings."""
    unsupported = []
    if body.n != 1:
        unsupported.append(("n", "only one choice per request (n = 1) is supported"))
    if body.presence_penalty or body.frequency_penalty:
        unsupported.append(("presence_penalty" if body.presence_penalty else "frequency_penalty",
                            "penalties are not supported"))
    if body.logit_bias:
        unsupported.append(("logit_bias", "logit_bias is not supported"))
    if body.logprobs not in (None, False, 0):
        unsupported.append(("logprobs", "logprobs are not supported"))
    if isinstance(body, CompletionBody):
        if body.echo:
            unsupported.append(("echo", "echo is not supported"))
        if body.suffix:
            unsupported.append(("suffix", "suffix is not supported"))
        if body.best_of not in (None, 1):
            unsupported.append(("best_of", "best_of is not supported"))
    if isinstance(body, ChatBody):
        if body.tools:
            unsupported.append(("tools", "tools are not supported"))
        rf = (body.response_format or {}).get("type", "text")
        if rf != "text":
            unsupported.append(("response_format", f"response_format {rf!r} is not supported (only text)"))
    if unsupported:
        p, m = unsupported[0]
        raise APIError(400, m, param=p, code="unsupported")
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise APIError(400, f"stop: up to {limits.max_stop} non-empty strings", param="stop")
    want = getattr(body, "max_completion_tokens", None) or body.max_tokens
    room = limits.n_ctx - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context is {limits.n_ctx}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if want is None:
        want = min(room, limits.max_tokens) if chat else min(limits.default_max_tokens, room)
    if want > limits.max_tokens:
        raise APIError(400, f"max_tokens is {want}; this server allows up to {limits.max_tokens}",
                       param="max_tokens", code="invalid_value")
    if prompt_len + want > limits.n_ctx:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({want}) exceed this server's "
                       f"context of {limits.n_ctx} tokens", param="max_tokens", code="context_length_exceeded")
    if body.min_tokens > want:
        raise APIError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({want})", param="min_tokens")
    seed = body.seed if body.seed is not None else uuid.uuid4().int & 0x7FFFFFFF
    return Sampling(int(want), float(body.temperature), float(body.top_p), int(body.top_k), int(seed), stops,
                    bool(body.ignore_eos), int(body.min_tokens))


def chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: content parts of type text joined (as llama.cpp)."""
    out = []
    for i, m in enumerate(body.messages):
        c = m.content
        if isinstance(c, list):
            texts = []
            for part in c:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported "
                                   f"(got type {part.get('type')!r})", param="messages", code="unsupported")
                texts.append(part["text"])
            c = "\n".join(texts)
        out.append({"role": m.role, "content": c or ""})
    return out


# ------------------------------------------------------------------------------------ responses
@dataclass
class Reply:
    """One response's fixed parts: id, creation time, model name, kind."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def usage(self, prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def full(self, text: str, finish: str, prompt: int, completion: int, extra: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(prompt, completion), "system_fingerprint": None, **extra}

    def chunk(self, text: str | None, finish: str | None, *, first: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "system_fingerprint": None, **(extra or {})}

    def usage_chunk(self, prompt: int, completion: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage(prompt, completion)}


class StopMatcher:
    """Text released so far, with stop strings cut: holds back the tail that could still become a
    stop string (llama.cpp's find_partial_stop_string), so no client sees part of a stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        buf = self.held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self.held = ""
            return buf[:cut]
        keep = 0
        for s in self.stops:  # the longest suffix of buf that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep] if keep else buf

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out
