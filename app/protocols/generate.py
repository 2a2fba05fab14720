"""Triton's generate extension: a flat JSON request; one JSON answer, or server-sent events.

    POST /v2/models/{name}[/versions/{v}]/generate          the whole answer, JSON
    POST /v2/models/{name}[/versions/{v}]/generate_stream   server-sent events as it is written

The request is one JSON object: the model's inputs, which are the fields of the worker's
request type, by name, and an optional ``parameters`` object holding more of them (a field
given both ways takes the top-level value)::

    {"prompt": "Once upon a time", "parameters": {"max_tokens": 32, "temperature": 0}}

The answer is ``{"model_name", "model_version", ...}`` with the fields of the worker's answer
(``to_answer``); each event of ``generate_stream`` is ``data: {"model_name", "model_version",
...}`` with the fields of one chunk. An answer or chunk that is not an object travels as
``"output"``.

Errors are KServe v2's ``{"error": "..."}`` with the status, as on every ``/v2`` path, while
the stream has not started; after its first event an error is one more event,
``data: {"error": "..."}``, and the stream ends (the status has gone out: a client must look
for it). The deadline: ``X-Request-Timeout`` or the ``timeout`` parameter (microseconds), as
for ``/infer``.

The routes are there for every model whose request is a JSON body (not uploads). A worker
that does not stream answers ``generate_stream`` with one event, its whole answer.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter

from ..serving.core import ServedModel, ServingCore
from ..serving.errors import ServingError
from ..serving.streams import OpenStream
from .http import DEADLINE_HEADER, DeadlineHeader, Guards, Protocol, request_lifetime
from .sse import EVENT_STREAM, EventStreamResponse, event, event_stream_docs
from .v2 import PREFIX, TIMEOUT_PARAMETER, error_docs_v2, render, served_model, timeout_parameter
from .v2_tensors import RESERVED_PARAMETERS, load_json

PARAMETERS = "parameters"
VERSION = "1"


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    if any(not model.declaration.uploads for model in core.models):
        app.include_router(build_router(core, guards))


def build_router(core: ServingCore, guards: Guards = ()) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["generate (Triton)"])
    guarded = [Depends(g) for g in guards]

    async def parse(request: Request, name: str, version: str | None,
                    deadline_s: float | None) -> tuple[ServedModel, Any, Any]:
        model = served_model(core, name, version)
        if model.declaration.uploads:
            raise ServingError(400, f"model {name!r} takes uploads: use /v2/models/{name}/infer")
        body = load_json(await request.body(), "the generate request")
        if not isinstance(body, dict):
            raise ServingError(400, "the generate request must be a JSON object")
        parameters = body.get(PARAMETERS) or {}
        if not isinstance(parameters, dict):
            raise ServingError(400, f"{PARAMETERS!r} must be a JSON object")
        lifetime = request_lifetime(request, {
            DEADLINE_HEADER: deadline_s,
            f"the {TIMEOUT_PARAMETER!r} parameter": timeout_parameter(body)})
        values = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
        values.update((k, v) for k, v in body.items() if k != PARAMETERS)
        return model, model.validate(values), lifetime

    async def generate(request: Request, name: str, version: str | None = None,
                       deadline_s: DeadlineHeader = None) -> Response:
        """The whole answer in one JSON object."""
        model, value, lifetime = await parse(request, name, version, deadline_s)
        answer = await core.infer(model, value, lifetime)
        return JSONResponse(with_model(model, model.answer_adapter, answer))

    async def generate_stream(request: Request, name: str, version: str | None = None,
                              deadline_s: DeadlineHeader = None) -> Response:
        """Server-sent events, one per chunk as the model writes it: ``data: {...}``; an
        error after the first event is ``data: {"error": "..."}``."""
        model, value, lifetime = await parse(request, name, version, deadline_s)
        if not model.declaration.streams:
            answer = await core.infer(model, value, lifetime)
            body = event(json.dumps(with_model(model, model.answer_adapter, answer)).encode())
            return Response(body, media_type=EVENT_STREAM)
        stream: OpenStream = await core.stream(model, value, lifetime)
        return EventStreamResponse(stream, encoder(model))

    streaming = [m.chunk_adapter for m in core.models if m.chunk_adapter is not None]
    stream_docs = event_stream_docs(streaming[0], "one chunk, with model_name and "
                                    "model_version") if len(streaming) == 1 else {
        "content": {EVENT_STREAM: {}}}
    errors = error_docs_v2(400, 401, 404, 413, 500, 503, 504)
    for suffix in ("", "/versions/{version}"):
        base = "/models/{name}" + suffix
        router.add_api_route(base + "/generate", generate, methods=["POST"],
                             dependencies=guarded, responses=errors,
                             name=f"generate{suffix and '_version'}")
        router.add_api_route(
            base + "/generate_stream", generate_stream, methods=["POST"], dependencies=guarded,
            name=f"generate_stream{suffix and '_version'}",
            responses={**errors, 200: {"description": "server-sent events", **stream_docs}})
    return router


def with_model(model: ServedModel, adapter: TypeAdapter[Any], value: Any) -> dict[str, Any]:
    """``{"model_name", "model_version", ...}`` with the fields of an answer or a chunk."""
    dumped = adapter.dump_python(value, mode="json", by_alias=True)
    fields = dumped if isinstance(dumped, dict) else {"output": dumped}
    return {"model_name": model.name, "model_version": VERSION, **fields}


def encoder(model: ServedModel) -> Any:
    """``generate_stream``'s events: each chunk with the model's name; an error as
    ``{"error": message}``, the shape of Triton's error answers."""
    adapter = model.chunk_adapter
    assert adapter is not None

    def encode(item: Any) -> bytes:
        if isinstance(item, ServingError):
            return event(json.dumps({"error": item.message}).encode())
        return event(json.dumps(with_model(model, adapter, item)).encode())

    return encode


PROTOCOL = Protocol("triton-generate", mount, render)
