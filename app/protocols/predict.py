"""``POST /predict`` (or the worker's ``route``): the request as the worker declares it.

The route is derived from the served worker's declaration (``app.serving.declaration``); its
signature is built so FastAPI reads it like a hand-written one, and validation, the OpenAPI
schema and the 422 answers are FastAPI's own:

    uploads (``ImageFile`` fields)  -> multipart file fields, checked by ``core.check_upload``
    the other fields of that request -> query parameters (``?top_k=3``)
    a request without uploads        -> the JSON body, validated by pydantic

Per request: check the uploads, build the request value, ``core.infer``, serialise the
answer. Errors are FastAPI's ``{"detail": ...}``.

A streaming worker's route answers with server-sent events when the client asks for a stream
(``Accept: text/event-stream``, or a true ``stream`` field), one chunk per event
(``app.protocols.sse``); otherwise with the whole answer in JSON, as any route.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel

from ..serving.core import ServedModel, ServingCore
from ..serving.declaration import Declaration, own_docstring
from ..serving.errors import ServingError
from .http import (
    DEADLINE_HEADER,
    DeadlineHeader,
    Guards,
    Protocol,
    core_of,
    detail_response,
    error_docs,
    request_lifetime,
)
from .schemas import ErrorBody
from .sse import EventStreamResponse, detail_encoder, event_stream_docs, wants_events

# The endpoint's parameter holding the query model; FastAPI flattens its fields into the
# query string, so the name is never seen by a client (and cannot clash with a field).
QUERY_PARAM = "_query"
DEADLINE_PARAM = "_deadline"
# The endpoint's Request: FastAPI finds it by its annotation. A leading underscore, as for the
# two above: no pydantic field can have such a name, so an upload field may be "request".
REQUEST_PARAM = "_request"
COMMON_ERRORS = (401, 500, 503, 504)
UPLOAD_ERRORS = {
    400: "empty file, corrupt or truncated image",
    422: f"a required file field is missing, or a parameter (or {DEADLINE_HEADER}) is out "
         "of range",
}
JSON_ERRORS = {
    413: "body over MAX_UPLOAD_MB, or more items than QUEUE_SIZE",
    422: f"the JSON body does not match the request schema, or {DEADLINE_HEADER} is invalid",
}
_ERROR_SCHEMA = {"model": ErrorBody}


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    """Each model at ``/models/{name}/predict``; the default one also at its route
    (``/predict``), and every other model at a route of its own that no model shares."""
    routes = [model.declaration.route for model in core.models]
    for model in core.models:
        route = model.declaration.route
        if model is core.default or (route != "/predict" and routes.count(route) == 1):
            add_inference_route(app.router, model, guards)
    for model in core.models:
        add_inference_route(app.router, model, guards, path=model_path(model.name),
                            operation_id=f"predict_{model.name}")

    async def unknown_model(name: str) -> None:
        core.model(name)  # raises the 404 that names the served models
        raise ServingError(405, f"POST /models/{name}/predict is served above")  # not reached

    app.router.add_api_route(
        model_path("{name}"), unknown_model, methods=["POST"], include_in_schema=False,
        dependencies=[Depends(g) for g in guards])


def model_path(name: str) -> str:
    return f"/models/{name}/predict"


async def check_form(request: Request, single_fields: Sequence[str],
                     query_fields: Sequence[str]) -> None:
    """422 for what FastAPI would drop without a word: several files for a one-file field
    (it keeps the last), a query parameter sent as a form field (it is not read there)."""
    if not single_fields and not query_fields:
        return
    form = await request.form()  # parsed by FastAPI already: this is its cached copy
    for name in single_fields:
        count = len(form.getlist(name))
        if count > 1:
            raise RequestValidationError([{
                "type": "too_long", "loc": ("body", name), "input": None,
                "msg": f"field {name!r} takes one file, got {count}"}])
    for name in query_fields:
        if name in form:
            raise RequestValidationError([{
                "type": "query_parameter", "loc": ("body", name), "input": None,
                "msg": f"{name!r} is a query parameter: send it in the URL (?{name}=...), "
                       "not as a form field"}])


def add_inference_route(router: APIRouter, model: ServedModel | Declaration,
                        guards: Sequence[Callable[..., Any]] = (), *, path: str | None = None,
                        operation_id: str = "predict") -> None:
    """Add ``POST path`` (default: the worker's ``route``) for the model, typed by its
    declaration; ``guards``: dependencies (the API key). A bare declaration is served under
    its worker's class name."""
    if isinstance(model, Declaration):
        name = model.worker_cls.__qualname__
        model = ServedModel(name, name, model)
    served = model
    decl = model.declaration
    answer = model.answer_adapter
    uploads, query_model = decl.uploads, decl.query_model
    request_type = decl.request_type
    request_model = (request_type if isinstance(request_type, type)
                     and issubclass(request_type, BaseModel) else None)

    single_fields = [name for name, many in uploads.items() if not many]
    query_fields = [] if query_model is None else [
        info.alias or name for name, info in query_model.model_fields.items()]

    answer_type = decl.answer_type
    # pydantic hands back an instance of the answer's own model class as it is (unless the
    # model asks to revalidate instances): such an answer is not run through the validator.
    answer_as_is = (isinstance(answer_type, type) and issubclass(answer_type, BaseModel)
                    and answer_type.model_config.get("revalidate_instances", "never") == "never")

    chunks = served.chunk_adapter
    encode = None if chunks is None else detail_encoder(chunks)

    async def answer_request(request: Request, value: Any, labels: list[str],
                             deadline_s: float | None) -> Response:
        lifetime = request_lifetime(request, {DEADLINE_HEADER: deadline_s})
        if encode is not None and wants_events(request, value):
            return EventStreamResponse(
                await core_of(request).stream(served, value, lifetime), encode)
        result = await core_of(request).infer(served, value, lifetime, labels)
        if not (answer_as_is and type(result) is answer_type):
            result = answer.validate_python(result)
        return Response(answer.dump_json(result), media_type="application/json")

    async def from_uploads(**params: Any) -> Response:
        request: Request = params.pop(REQUEST_PARAM)
        core = core_of(request)
        query = params.pop(QUERY_PARAM, None)
        deadline_s = params.pop(DEADLINE_PARAM, None)
        core.check_file_count(
            sum(len(v) if isinstance(v, list) else v is not None for v in params.values()))
        await check_form(request, single_fields, query_fields)
        values: dict[str, Any] = dict(query) if query is not None else {}
        labels: list[str] = []
        number = 0
        for name, files in params.items():
            if files is None:
                continue
            checked = []
            for upload in files if isinstance(files, list) else [files]:
                number += 1
                label = (f"file {number} ({upload.filename})" if upload.filename
                         else f"file {number}")
                checked.append(core.check_upload(await upload.read(), label, upload.filename))
            labels += [image.label for image in checked]
            values[name] = checked if uploads[name] else checked[0]
        # The values are keyed by field name, also those the client sent under an alias
        # (FastAPI read ?minSide= into the query model's min_side); a model validator of the
        # worker's request may still refuse them (422, without the input: it holds images).
        value = served.validate(values)
        return await answer_request(request, value, labels, deadline_s)

    async def from_json(body: Any, **params: Any) -> Response:
        return await answer_request(params[REQUEST_PARAM], body, [], params.get(DEADLINE_PARAM))

    parameters = [
        inspect.Parameter(REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        inspect.Parameter(DEADLINE_PARAM, inspect.Parameter.KEYWORD_ONLY,
                          annotation=DeadlineHeader, default=None)]
    if uploads:
        assert request_model is not None
        endpoint: Callable[..., Any] = from_uploads
        for name, many in uploads.items():
            info = request_model.model_fields[name]
            kind: Any = list[UploadFile] if many else UploadFile
            required = info.is_required()
            parameters.append(inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[kind if required else kind | None,
                                     File(description=info.description,
                                          min_length=1 if many else None)],
                default=inspect.Parameter.empty if required else None))
        if query_model is not None:
            parameters.append(inspect.Parameter(
                QUERY_PARAM, inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[query_model, Query()]))
        statuses: tuple[int, ...] = (400, 413, 415, 422)
        texts = UPLOAD_ERRORS
    else:
        endpoint = from_json
        parameters.append(inspect.Parameter(
            "body", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[request_type, Body()]))
        statuses, texts = (400, 413, 422), JSON_ERRORS
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    doc = own_docstring(decl.worker_cls)
    responses = error_docs([*COMMON_ERRORS, *statuses], _ERROR_SCHEMA, texts)
    if chunks is not None:
        responses[200] = {
            "description": "The whole answer in JSON; or, when the client sends `Accept: "
                           "text/event-stream` or sets `stream` true, server-sent events as "
                           "the model writes: `data: <chunk>` per chunk, and `event: error` "
                           "with `data: {\"detail\": ...}` for an error after the first chunk",
            **event_stream_docs(chunks, "one chunk: the JSON of each event's data line")}
    router.add_api_route(
        path or decl.route, endpoint, methods=["POST"], response_model=decl.answer_type,
        responses=responses,
        dependencies=[Depends(g) for g in guards], tags=["inference"], name=operation_id,
        operation_id=operation_id,
        summary=f"Run {decl.worker_cls.__name__}" + (
            f" ({served.name})" if path is not None else ""), description=doc)


PROTOCOL = Protocol("predict", mount, detail_response)
