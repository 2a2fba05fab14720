"""The OpenAI API: the ``openai`` client and the tools built on it reach the served models.

    GET  /v1/models                 the served models
    POST /v1/completions            a prompt (or several) -> text; ``stream`` for events
    POST /v1/chat/completions       chat messages -> the assistant's reply; ``stream`` too
    POST /v1/embeddings             texts -> vectors (``float`` or ``base64``)

A model is reached here when its worker declares the task (``ModelWorker.task``):
``"text-generation"`` (a streaming worker whose request has ``prompt`` and/or ``messages``
fields and whose chunks have ``text``, ``tokens``, ``finish_reason`` and ``prompt_tokens``,
as ``app.examples.causal_lm``) or ``"embedding"`` (a request with an ``input`` list of texts,
an answer with ``embeddings`` and ``prompt_tokens``, as ``app.examples.text_embedder``).

A request parameter reaches the worker when its request type has a field of that name
(``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``...); ``n`` and several prompts
are served here as that many streams. A parameter the worker does not take is a 400 naming it,
unless it is sent with its neutral value (``n: 1``, ``echo: false``, ``presence_penalty: 0``
...): never silently ignored.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the status codes
its client maps to its exception classes; a stream that fails after its first event ends with
an error event of that shape (and no ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from ..ops.logs import request_id_var
from ..ops.middleware import STREAM
from ..serving.core import ServedModel, ServingCore
from ..serving.errors import ServingError
from ..serving.lifetime import Lifetime
from ..serving.streams import OpenStream
from .http import DEADLINE_HEADER, DeadlineHeader, Guards, Protocol, request_lifetime
from .sse import EVENT_STREAM, HEADERS, event

GENERATE = "text-generation"
EMBED = "embedding"
PREFIXES = ("/v1/models", "/v1/completions", "/v1/chat", "/v1/embeddings")
OWNER = "stateful-pool"
# Parameters served here rather than by the worker.
OWN = frozenset({"model", "stream", "stream_options", "n", "user"})
# A parameter sent with one of these values asks for nothing: accepted without the worker.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "logprobs": (False, None), "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "best_of": (1, None),
    "logit_bias": (None, {}), "suffix": (None, ""), "parallel_tool_calls": (None,),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None,),
    "encoding_format": ("float", "base64", None), "dimensions": (None,)}
MAX_CHOICES = 16

# ---- the wire shapes ---------------------------------------------------------------------------


class _Open(BaseModel):
    """A request body: the known fields typed, any other field kept (it is checked against
    what the worker takes)."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)


class CompletionBody(_Open):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Open):
    messages: list[ChatMessage] = Field(min_length=1)


class EmbeddingBody(_Open):
    input: str | list[str]
    encoding_format: str = "float"


# ---- errors ------------------------------------------------------------------------------------

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(ServingError):
    """A refusal that names the request parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(status, message)
        self.param = param
        self.code = code


def error_body(error: ServingError) -> dict[str, Any]:
    param = getattr(error, "param", None)
    code = getattr(error, "code", None)
    if code is None:
        code = {401: "invalid_api_key", 404: "model_not_found", 503: "unavailable",
                504: "timeout"}.get(error.status)
    kind = TYPES.get(error.status, "server_error" if error.status >= 500 else
                     "invalid_request_error")
    message = error.message
    if error.errors:  # a validation error: say which parameter, on one line
        first = error.errors[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = param or ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: "
                            f"{e.get('msg')}" for e in error.errors)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def render(error: ServingError) -> Response:
    status = 400 if error.status == 422 else error.status
    return JSONResponse(error_body(error), status, error.headers)


# ---- from the OpenAI request to the worker's request -------------------------------------------


def worker_values(model: ServedModel, body: _Open, given: dict[str, Any]) -> dict[str, Any]:
    """The worker's request fields from the client's parameters; 400 for one it lacks."""
    fields = model.request_fields
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in OWN:
            continue
        if name in fields:
            values[name] = value
        elif value not in NEUTRAL.get(name, ()) or name not in NEUTRAL:
            raise OpenAIError(400, f"model {model.name!r} does not support the parameter "
                                   f"{name!r}", param=name, code="unsupported_parameter")
    return values


def chat_text(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or its text parts; other parts are refused."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"message {index} holds a {part.get('type')!r} part; this "
                                   "model takes text only", param=f"messages[{index}].content",
                              code="unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


def generator_of(core: ServingCore, name: str) -> ServedModel:
    model = core.model(name)
    if model.task != GENERATE:
        raise OpenAIError(404, f"model {name!r} does not generate text (its task is "
                               f"{model.task or 'not declared'})", param="model",
                          code="model_not_found")
    return model


# ---- the routes --------------------------------------------------------------------------------


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    app.include_router(build_router(core, guards))


def build_router(core: ServingCore, guards: Guards = ()) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(g) for g in guards])
    created = int(time.time())
    errors: dict[int | str, dict[str, Any]] = {
        status: {"description": TYPES.get(status, "server_error")}
        for status in (400, 401, 404, 500, 503, 504)}

    @router.get("/models")
    async def list_models() -> Any:
        """The served models, in the shape of OpenAI's model list."""
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": OWNER,
             "ready": core.readiness(m) is None}
            for m in core.models]}

    @router.get("/models/{model_id}", responses={
        404: {"description": "no model is served under this id"}})
    async def retrieve_model(model_id: str) -> Any:
        model = core.model(model_id)
        return {"id": model.name, "object": "model", "created": created, "owned_by": OWNER}

    @router.post("/completions", responses=errors)
    async def completions(request: Request, deadline_s: DeadlineHeader = None) -> Response:
        """Text for a prompt, or for each of several: as JSON, or as events with ``stream``."""
        body = await parse(request, CompletionBody)
        model = generator_of(core, body.model)
        if "prompt" not in model.request_fields:
            raise OpenAIError(400, f"model {model.name!r} takes chat messages only: use "
                                   "/v1/chat/completions", param="prompt")
        given = body.model_dump(exclude_unset=True)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "'prompt' is an empty list", param="prompt")
        base = worker_values(model, body, {k: v for k, v in given.items() if k != "prompt"})
        requests = [{**base, "prompt": p} for p in prompts]
        return await answer(request, core, model, body, given, requests, deadline_s, chat=False)

    @router.post("/chat/completions", responses=errors)
    async def chat_completions(request: Request,
                               deadline_s: DeadlineHeader = None) -> Response:
        """The assistant's reply to chat messages: as JSON, or as events with ``stream``."""
        body = await parse(request, ChatBody)
        model = generator_of(core, body.model)
        if "messages" not in model.request_fields:
            raise OpenAIError(400, f"model {model.name!r} takes a prompt only: use "
                                   "/v1/completions", param="messages")
        given = body.model_dump(exclude_unset=True)
        messages = [{"role": m.role, "content": chat_text(m, i)}
                    for i, m in enumerate(body.messages)]
        base = worker_values(model, body, {k: v for k, v in given.items() if k != "messages"})
        return await answer(request, core, model, body, given, [{**base, "messages": messages}],
                            deadline_s, chat=True)

    @router.post("/embeddings", responses=errors)
    async def embeddings(request: Request, deadline_s: DeadlineHeader = None) -> Response:
        """One vector per input text; ``encoding_format: base64`` packs each as float32."""
        body = await parse(request, EmbeddingBody)
        model = core.model(body.model)
        if model.task != EMBED:
            raise OpenAIError(404, f"model {model.name!r} does not embed text (its task is "
                                   f"{model.task or 'not declared'})", param="model",
                              code="model_not_found")
        if body.encoding_format not in ("float", "base64"):
            raise OpenAIError(400, "encoding_format is 'float' or 'base64'",
                              param="encoding_format")
        texts = [body.input] if isinstance(body.input, str) else body.input
        given = body.model_dump(exclude_unset=True)
        values = worker_values(model, body, {k: v for k, v in given.items()
                                             if k not in ("input", "encoding_format")})
        value = validated(model, {**values, "input": texts})
        lifetime = request_lifetime(request, {DEADLINE_HEADER: deadline_s})
        result = await core.infer(model, value, lifetime)
        vectors = result.embeddings
        data = [{"object": "embedding", "index": i,
                 "embedding": pack(v) if body.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)]
        tokens = int(getattr(result, "prompt_tokens", 0) or 0)
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return router


async def parse(request: Request, body_type: type[_Open]) -> Any:
    raw = await request.body()
    try:
        return body_type.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in error["loc"])
        raise OpenAIError(400, f"{loc}: {error['msg']}" if loc else error["msg"],
                          param=loc or None) from None


def validated(model: ServedModel, values: dict[str, Any]) -> Any:
    """The worker's request value; its 422 becomes a 400 naming the parameter."""
    try:
        return model.validate(values)
    except ServingError as exc:
        if exc.errors:
            first = exc.errors[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise OpenAIError(400, f"{loc}: {first.get('msg')}" if loc else exc.message,
                              param=loc or None) from None
        raise


def pack(vector: Sequence[float]) -> str:
    """float32, little-endian, base64: what the client decodes for ``base64``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ---- answers: n choices of each prompt ---------------------------------------------------------


async def answer(request: Request, core: ServingCore, model: ServedModel, body: _Open,
                 given: dict[str, Any], requests: list[dict[str, Any]],
                 deadline_s: float | None, *, chat: bool) -> Response:
    """``n`` choices per request, as one JSON answer or one event stream."""
    choices = []
    for values in requests:
        for k in range(body.n):
            seeded = dict(values)
            if k and seeded.get("seed") is not None:  # n choices, n different draws
                seeded["seed"] = int(seeded["seed"]) + k
            seeded.pop("stream", None)
            choices.append(validated(model, seeded))
    if len(choices) > MAX_CHOICES:
        raise OpenAIError(400, f"{len(choices)} choices asked for (prompts x n); at most "
                               f"{MAX_CHOICES}", param="n")
    ident = ("chatcmpl-" if chat else "cmpl-") + request_id_var.get()
    created = int(time.time())
    lifetime = request_lifetime(request, {DEADLINE_HEADER: deadline_s})
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        streams = await open_all(core, model, choices, lifetime)
        return ChoiceEvents(streams, Shape(ident, created, model.name, chat), include_usage)
    answers = await asyncio.gather(*(core.infer(model, value, lifetime) for value in choices))
    prompt_tokens = sum(a.prompt_tokens for a in answers[::body.n])
    completion = sum(a.completion_tokens for a in answers)
    out = []
    for i, a in enumerate(answers):
        if chat:
            out.append({"index": i, "message": {"role": "assistant", "content": a.text},
                        "finish_reason": a.finish_reason, "logprobs": None})
        else:
            out.append({"index": i, "text": a.text, "finish_reason": a.finish_reason,
                        "logprobs": None})
    return JSONResponse({
        "id": ident, "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": model.name, "choices": out,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion}})


async def open_all(core: ServingCore, model: ServedModel, choices: list[Any],
                   lifetime: Lifetime) -> list[OpenStream]:
    """Open one stream per choice; if one is refused, close those already open."""
    opened: list[OpenStream] = []
    try:
        for value in choices:
            opened.append(await core.stream(model, value, lifetime))
    except BaseException:
        for stream in opened:
            await stream.aclose()
        raise
    return opened


class Shape:
    """The fields every event of one answer repeats."""

    def __init__(self, ident: str, created: int, model: str, chat: bool) -> None:
        self.ident, self.created, self.model, self.chat = ident, created, model, chat

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
              ) -> bytes:
        data: dict[str, Any] = {
            "id": self.ident, "object": "chat.completion.chunk" if self.chat
            else "text_completion", "created": self.created, "model": self.model,
            "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return event(json.dumps(data, separators=(",", ":")).encode())

    def delta(self, index: int, text: str | None, finish: str | None,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}


class ChoiceEvents(Response):
    """The events of one answer: its choices' chunks as they come, interleaved, a usage
    chunk if asked for, then ``[DONE]``; an error after the first event ends it with an
    OpenAI error event."""

    media_type = EVENT_STREAM

    def __init__(self, streams: list[OpenStream], shape: Shape, include_usage: bool) -> None:
        super().__init__(None, 200, HEADERS, EVENT_STREAM)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.streams, self.shape, self.include_usage = streams, shape, include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[STREAM] = self.streams[0]

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        shape = self.shape
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        failed = False
        try:
            if shape.chat:  # the role first, as OpenAI's streams begin
                await body(shape.chunk([shape.delta(i, "", None, first=True)
                                        for i in range(len(self.streams))]))
            async for index, item in merged(self.streams):
                if isinstance(item, ServingError):
                    await body(event(json.dumps(error_body(item)).encode()))
                    failed = True
                    break
                usage["prompt_tokens"] += item.prompt_tokens or 0
                usage["completion_tokens"] += item.tokens
                if item.text or item.finish_reason is None:
                    await body(shape.chunk([shape.delta(index, item.text, None)]))
                if item.finish_reason is not None:
                    await body(shape.chunk([shape.delta(index, None if shape.chat else "",
                                                        item.finish_reason)]))
            if not failed:
                if self.include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    await body(shape.chunk([], usage))
                await body(b"data: [DONE]\n\n")
        finally:
            for stream in self.streams:
                await stream.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def merged(streams: list[OpenStream]) -> AsyncIterator[tuple[int, Any]]:
    """The items of several open streams as each comes, with its stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: OpenStream) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is done:
                left -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


PROTOCOL = Protocol("openai", mount, render, PREFIXES)
