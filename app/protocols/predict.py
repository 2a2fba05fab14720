"""``POST /predict`` (or the worker's ``route``): the request as the worker declares it.

The route is derived from the served worker's declaration (``app.serving.declaration``); its
signature is built so FastAPI reads it like a hand-written one, and validation, the OpenAPI
schema and the 422 answers are FastAPI's own:

    uploads (``ImageFile`` fields)  -> multipart file fields, checked by ``core.check_upload``
    the other fields of that request -> query parameters (``?top_k=3``)
    a request without uploads        -> the JSON body, validated by pydantic

Per request: check the uploads, build the request value, ``core.infer``, serialise the
answer. Errors are FastAPI's ``{"detail": ...}``.

An upload route reads the common request itself (``UploadRoute``): named files under the
upload fields, no query string, at most a plain ``X-Request-Timeout``, and no dependency
(the API key) to resolve. Such a request passes FastAPI's checks by construction, so they are
skipped, and a small plain multipart body is split here (``_multipart_parts``) rather than
spooled file by file through Starlette's parser. Any other request goes to FastAPI's own
handler, unchanged: whatever a client sends is answered as FastAPI answers it.

A streaming worker's route answers with server-sent events when the client asks for a stream
(``Accept: text/event-stream``, or a true ``stream`` field), one chunk per event
(``app.protocols.sse``); otherwise with the whole answer in JSON, as any route.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException

try:  # FastAPI's native OpenTelemetry (recent versions)
    from fastapi import telemetry as fastapi_telemetry
except ImportError:  # pragma: no cover - an older FastAPI traces nothing itself
    fastapi_telemetry = None  # type: ignore[assignment]
try:  # Starlette's request body limit (recent versions), which FastAPI may set
    from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
except ImportError:  # pragma: no cover
    MAX_BODY_SIZE_SCOPE_KEY = "starlette.max_body_size"

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
# A client's X-Request-Timeout that needs no more than float() to read; any other value is
# left to FastAPI's validation (and its 422).
_PLAIN_SECONDS = re.compile(rb"[0-9]{1,15}(\.[0-9]{1,15})?")
_DEADLINE_KEY = DEADLINE_HEADER.lower().encode("latin-1")

# The multipart bodies split by the route itself (``_multipart_parts``): up to the size that
# Starlette's parser would keep in memory too, with a plain boundary and plain part headers.
_SPLIT_MAX_BYTES = 1024 * 1024
_MULTIPART_TYPE = re.compile(
    rb'(?i:multipart/form-data); boundary=(?:([0-9A-Za-z\'()+_,./:=?-]{1,70})'
    rb'|"([0-9A-Za-z\'()+_,./:=?-]{1,70})")')
_PART_HEAD_MAX = 1024
_PART_HEADERS_MAX = 4
_PART_HEADER = re.compile(rb"([A-Za-z0-9-]+): ([^ \r\n][^\r\n]*)")
_FILE_DISPOSITION = re.compile(rb'form-data; name="([^"\\;\r\n]+)"; filename="([^"\\;\r\n]+)"')

Handler = Callable[[Request], Awaitable[Response]]
# Upload field -> the files sent under it, as (filename, bytes).
Files = dict[str, list[tuple[str | None, bytes]]]


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    """Each model at ``/models/{name}/predict``; the default one also at its route
    (``/predict``), and every other model at a route of its own that no model shares."""
    routes = [model.declaration.route for model in core.models]
    for model in core.models:
        route = model.declaration.route
        if model is core.default or (route != "/predict" and routes.count(route) == 1):
            add_inference_route(app.router, model, guards, core=core)
    for model in core.models:
        add_inference_route(app.router, model, guards, path=model_path(model.name),
                            operation_id=f"predict_{model.name}", core=core)

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


def _traced() -> bool:
    """Whether FastAPI's own telemetry follows this request (its operation spans)."""
    return fastapi_telemetry is not None and fastapi_telemetry.get_telemetry_data() is not None


def _form_limits(scope: Any) -> Any:
    """Form limits that an app or a router set for FastAPI to apply (recent versions)."""
    fastapi_scope = scope.get("fastapi")
    return isinstance(fastapi_scope, dict) and fastapi_scope.get("form_limits")


def _request_head(headers: Sequence[tuple[bytes, bytes]]
                  ) -> tuple[float | None | bool, bytes | None]:
    """From the request's headers, in one pass: its ``X-Request-Timeout`` (its first value;
    None without one; False for a value FastAPI must validate: not a plain decimal, or below
    its minimum), and the multipart boundary of a body small and plain enough for
    ``_multipart_parts`` (else None)."""
    deadline: float | None | bool = None
    content_type = length = None
    for key, value in headers:
        if key == _DEADLINE_KEY:
            if deadline is None:
                seconds = float(value) if _PLAIN_SECONDS.fullmatch(value) else 0.0
                deadline = seconds if seconds >= 0.001 else False
        elif key == b"content-type":
            if content_type is None:
                content_type = value
        elif key == b"content-length" and length is None:
            length = value
    if (content_type is None or length is None or not length.isdigit()
            or int(length) > _SPLIT_MAX_BYTES):
        return deadline, None
    match = _MULTIPART_TYPE.fullmatch(content_type)
    return deadline, None if match is None else (match[1] or match[2])


def _multipart_parts(body: bytes, boundary: bytes) -> list[tuple[bytes, bytes, bytes]] | None:
    """The (name, filename, bytes) of each part of a multipart body that is a named file
    with plain headers, as Starlette's parser would read them; None for any other body (a
    field that is not a file, a quoted-pair or an extended parameter, a preamble, padding,
    malformed framing...), which is then left to that parser."""
    delimiter = b"\r\n--" + boundary
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    parts = []
    start = len(delimiter) - 2  # at the CRLF after the first boundary
    while True:
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0 or head_end - start > _PART_HEAD_MAX:
            return None
        name = filename = None
        lines = body[start + 2:head_end].split(b"\r\n")
        if len(lines) > _PART_HEADERS_MAX:
            return None
        for line in lines:
            header = _PART_HEADER.fullmatch(line)
            if header is None:
                return None
            if header[1].lower() == b"content-disposition":
                disposition = _FILE_DISPOSITION.fullmatch(header[2])
                if disposition is None or name is not None:
                    return None
                name, filename = disposition[1], disposition[2]
        end = body.find(delimiter, head_end + 4)
        if name is None or not filename or end < 0:
            return None
        parts.append((name, filename, body[head_end + 4:end]))
        after = body[end + len(delimiter):end + len(delimiter) + 2]
        if after == b"--":
            rest = body[end + len(delimiter) + 2:]
            return parts if rest in (b"", b"\r\n") and len(parts) <= 1000 else None
        if after != b"\r\n":
            return None
        start = end + len(delimiter)


def _decoded(raw: bytes) -> str:
    """A name or filename as Starlette decodes it (UTF-8, else Latin-1)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _files_of_parts(parts: list[tuple[bytes, bytes, bytes]], uploads: dict[str, bool],
                    required: dict[str, bool]) -> Files | None:
    """``parts`` by upload field, when they pass FastAPI's checks of the route's file
    parameters (each part under an upload field, each required field sent, a one-file field
    sent once); else None."""
    files: Files = {}
    for raw_name, raw_filename, data in parts:
        name = _decoded(raw_name)
        if name not in uploads:
            return None
        files.setdefault(name, []).append((_decoded(raw_filename), data))
    for name, many in uploads.items():
        sent = files.get(name)
        if (sent is None and required[name]) or (sent is not None and not many
                                                 and len(sent) > 1):
            return None
    # In the order of the fields, as FastAPI hands them over.
    return {name: files[name] for name in uploads if name in files}


async def _read_uploads(sent: dict[str, Any]) -> Files:
    """Each upload field's files (an UploadFile, a list of them, or None) read, as
    (filename, bytes)."""
    files: Files = {}
    for name, uploaded in sent.items():
        if uploaded is not None:
            files[name] = [(upload.filename, await upload.read()) for upload in
                           (uploaded if isinstance(uploaded, list) else [uploaded])]
    return files


def _uploads_of(form: Any, uploads: dict[str, bool], required: dict[str, bool]
                ) -> dict[str, Any] | None:
    """Each upload field's file (or list of files, or None when an optional field is
    absent), when the form holds named files under upload fields only and each field as
    many as it takes; else None (FastAPI's checks and errors then apply)."""
    for key in form.keys():
        if key not in uploads:
            return None
    files: dict[str, Any] = {}
    for name, many in uploads.items():
        got = form.getlist(name)
        if not got:
            if required[name]:
                return None
            files[name] = None
            continue
        for upload in got:
            if not isinstance(upload, StarletteUploadFile) or not upload.filename:
                return None
        if many:
            files[name] = got
        elif len(got) == 1:
            files[name] = got[0]
        else:
            return None
    return files


def add_inference_route(router: APIRouter, model: ServedModel | Declaration,
                        guards: Sequence[Callable[..., Any]] = (), *, path: str | None = None,
                        operation_id: str = "predict", core: ServingCore | None = None) -> None:
    """Add ``POST path`` (default: the worker's ``route``) for the model, typed by its
    declaration; ``guards``: dependencies (the API key); ``core``: the app's serving core
    (default: the one in ``app.state``, looked up per request). A bare declaration is served
    under its worker's class name."""
    if isinstance(model, Declaration):
        name = model.worker_cls.__qualname__
        model = ServedModel(name, name, model)
    served = model
    serving = core
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

    async def answer_request(request: Request, core: ServingCore, value: Any,
                             labels: list[str], deadline_s: float | None) -> Response:
        lifetime = request_lifetime(request, {DEADLINE_HEADER: deadline_s}, core)
        if encode is not None and wants_events(request, value):
            return EventStreamResponse(await core.stream(served, value, lifetime), encode)
        result = await core.infer(served, value, lifetime, labels)
        if not (answer_as_is and type(result) is answer_type):
            result = answer.validate_python(result)
        return Response(answer.dump_json(result), media_type="application/json")

    async def answer_uploads(request: Request, core: ServingCore, query: Any,
                             deadline_s: float | None, files: Files) -> Response:
        """The answer to uploads that passed FastAPI's checks: ``files`` maps each upload
        field sent to its files, as (filename, bytes)."""
        values: dict[str, Any] = dict(query) if query is not None else {}
        labels: list[str] = []
        number = 0
        for name, uploaded in files.items():
            checked = []
            for filename, data in uploaded:
                number += 1
                label = f"file {number} ({filename})" if filename else f"file {number}"
                checked.append(core.check_upload(data, label, filename))
            labels += [image.label for image in checked]
            values[name] = checked if uploads[name] else checked[0]
        # The values are keyed by field name, also those the client sent under an alias
        # (FastAPI read ?minSide= into the query model's min_side); a model validator of the
        # worker's request may still refuse them (422, without the input: it holds images).
        value = served.validate(values)
        return await answer_request(request, core, value, labels, deadline_s)

    async def from_uploads(**params: Any) -> Response:
        request: Request = params.pop(REQUEST_PARAM)
        core = serving or core_of(request)
        query = params.pop(QUERY_PARAM, None)
        deadline_s = params.pop(DEADLINE_PARAM, None)
        core.check_file_count(
            sum(len(v) if isinstance(v, list) else v is not None for v in params.values()))
        await check_form(request, single_fields, query_fields)
        return await answer_uploads(request, core, query, deadline_s,
                                    await _read_uploads(params))

    upload_required = {name: request_model.model_fields[name].is_required()
                       for name in uploads} if request_model is not None else {}
    query_adapter = None if query_model is None else TypeAdapter(query_model)

    def fast_uploads(full: Handler) -> Handler:
        """The route's handler: the common request (named files under the upload fields, no
        query string, at most a plain ``X-Request-Timeout``) read without FastAPI's
        parameter resolution, and a small well-formed multipart body split here rather than
        spooled through Starlette's parser; any other request goes to FastAPI's handler
        (``full``), whose checks and errors are the route's."""

        async def handle(request: Request) -> Response:
            scope = request.scope
            if (scope["query_string"] or MAX_BODY_SIZE_SCOPE_KEY in scope
                    or _form_limits(scope) or _traced()):
                return await full(request)
            deadline_s, boundary = _request_head(scope["headers"])
            if deadline_s is False:
                return await full(request)
            query = None
            if query_adapter is not None:
                try:
                    query = query_adapter.validate_python({})
                except ValidationError:
                    return await full(request)  # a required query parameter is missing
            # The body is read as FastAPI reads a form, with its errors.
            try:
                if boundary is not None:
                    parts = _multipart_parts(await request.body(), boundary)
                if boundary is None or parts is None:
                    form = await request.form()  # the cached body, if read above
            except HTTPException:
                raise
            except Exception as exc:
                raise HTTPException(400, "There was an error parsing the body") from exc
            core = serving or core_of(request)
            if boundary is not None and parts is not None:
                files = _files_of_parts(parts, uploads, upload_required)
                if files is None:
                    return await full(request)
                core.check_file_count(sum(len(v) for v in files.values()))
                return await answer_uploads(request, core, query, deadline_s, files)
            try:
                sent = _uploads_of(form, uploads, upload_required)
                if sent is None:
                    return await full(request)
                core.check_file_count(sum(
                    len(v) if isinstance(v, list) else v is not None for v in sent.values()))
                return await answer_uploads(request, core, query, deadline_s,
                                            await _read_uploads(sent))
            finally:
                await form.close()

        return handle

    async def from_json(body: Any, **params: Any) -> Response:
        request = params[REQUEST_PARAM]
        return await answer_request(request, serving or core_of(request), body, [],
                                    params.get(DEADLINE_PARAM))

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
    route_class = router.route_class
    if uploads:
        base = route_class

        class UploadRoute(base):  # type: ignore[valid-type, misc]
            def get_route_handler(self) -> Handler:
                full: Handler = super().get_route_handler()
                # Dependencies (the API key, a router's own) are FastAPI's to resolve.
                if self.dependant.dependencies or getattr(self, "form_limits", None):
                    return full
                return fast_uploads(full)

        route_class = UploadRoute
    router.add_api_route(
        path or decl.route, endpoint, methods=["POST"], response_model=decl.answer_type,
        responses=responses, route_class_override=route_class,
        dependencies=[Depends(g) for g in guards], tags=["inference"], name=operation_id,
        operation_id=operation_id,
        summary=f"Run {decl.worker_cls.__name__}" + (
            f" ({served.name})" if path is not None else ""), description=doc)


PROTOCOL = Protocol("predict", mount, detail_response)
