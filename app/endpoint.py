"""The inference route, derived from the served worker's declaration (``app.contract``).

``declaration_of(worker_cls)`` reads what the worker file declares: the request type (the
annotation of ``to_items``'s request parameter), the answer type (the return annotation of
``to_answer``) and which request fields are uploads. ``inference_route`` turns that into a
FastAPI route whose signature FastAPI reads like a hand-written one, so validation, the
OpenAPI schema and the 422 answers are FastAPI's own:

    uploads (``ImageFile`` fields)  -> multipart file fields, checked by ``inspect_image``
    the other fields of that request -> query parameters (``?top_k=3``)
    a request without uploads        -> the JSON body, validated by pydantic

Per request: check the uploads, build the request, ``to_items``, one pool task per item,
``to_answer``, serialise. A plain ``SWorker`` with an ``output_model`` (the contract before
``ModelWorker``) is served as an image classifier was: ``files`` + ``top_k`` in, ``{"predictions":
[{"filename", **output}]}`` out.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter, ValidationError, create_model

from stateful_pool import SWorker

from .contract import ImageFile, ImageInput, InvalidInputError, ModelWorker
from .images import ImageRejected, inspect_image
from .lifetime import DEADLINE_HEADER, DeadlineHeader, request_lifetime, run_for_client
from .schemas import ErrorBody, predict_response_model
from .state import server_state
from .tracing import task_context

_COMMON_ERRORS = {
    401: "API_KEY is set and the bearer token is missing or wrong",
    500: "the model worker crashed under this request (it is restarted)",
    503: "queue full or no worker ready; see Retry-After",
    504: f"no answer within REQUEST_TIMEOUT_S or the client's {DEADLINE_HEADER}",
}
UPLOAD_ERRORS = {
    400: "empty file, corrupt or truncated image",
    413: "body over MAX_UPLOAD_MB, more than MAX_FILES files (or QUEUE_SIZE items), or too "
         "many pixels",
    415: "not an image, or a format outside JPEG, PNG, WebP, BMP, GIF",
    422: f"a required file field is missing, or a parameter (or {DEADLINE_HEADER}) is out "
         "of range",
}
# The endpoint's parameter holding the query model; FastAPI flattens its fields into the
# query string, so the name is never seen by a client (and cannot clash with a field).
QUERY_PARAM = "_query"
DEADLINE_PARAM = "_deadline"
# The endpoint's Request: FastAPI finds it by its annotation. A leading underscore, as for the
# two above: no pydantic field can have such a name, so an upload field may be "request".
REQUEST_PARAM = "_request"
JSON_ERRORS = {
    400: "an input the model cannot take (the message names it)",
    413: "body over MAX_UPLOAD_MB, or more items than QUEUE_SIZE",
    422: f"the JSON body does not match the request schema, or {DEADLINE_HEADER} is invalid",
}


@dataclass(frozen=True)
class Declaration:
    """What the server needs to know about a worker class to serve it over HTTP.

    Attributes:
        uploads: upload field name -> whether it takes several files.
        query_model: the non-upload fields of an upload request (query parameters).
    """

    worker_cls: type[SWorker[Any, Any]]
    request_type: Any
    answer_type: Any
    to_items: Callable[[Any], list[Any]]
    to_answer: Callable[[Any, list[Any]], Any]
    uploads: dict[str, bool]
    query_model: type[BaseModel] | None
    route: str


def declaration_of(worker_cls: type[SWorker[Any, Any]]) -> Declaration:
    """Read the request and answer types of a worker class.

    Raises:
        ValueError: a ``ModelWorker`` whose hooks are missing or unannotated, or whose request
            mixes uploads with fields that cannot be query parameters.
    """
    if not issubclass(worker_cls, ModelWorker):
        return _plain_worker_declaration(worker_cls)
    name = worker_cls.__qualname__
    for hook in ("to_items", "to_answer"):
        if getattr(worker_cls, hook).__func__ is getattr(ModelWorker, hook).__func__:
            raise ValueError(f"{name} must define the class method {hook}()")
    try:
        item_hints = typing.get_type_hints(worker_cls.to_items)
        answer_hints = typing.get_type_hints(worker_cls.to_answer)
    except NameError as exc:
        raise ValueError(f"{name}: cannot resolve an annotation ({exc}); define the request "
                         "and answer types at module level") from None
    params = [p for p in inspect.signature(worker_cls.to_items).parameters]
    if not params or params[0] not in item_hints:
        raise ValueError(f"{name}.to_items(request) must annotate its request parameter")
    if "return" not in answer_hints:
        raise ValueError(f"{name}.to_answer() must annotate its return type (the answer)")
    request_type = item_hints[params[0]]
    uploads = _split_uploads(name, request_type)
    if (worker_cls.execute_batch is ModelWorker.execute_batch
            and worker_cls.execute is ModelWorker.execute):
        raise ValueError(f"{name} must define execute_batch() or execute()")
    return Declaration(worker_cls, request_type, answer_hints["return"],
                       worker_cls.to_items, worker_cls.to_answer, *uploads, worker_cls.route)


def _split_uploads(name: str, request_type: Any) -> tuple[dict[str, bool], type[BaseModel] | None]:
    if not (isinstance(request_type, type) and issubclass(request_type, BaseModel)):
        return {}, None
    uploads: dict[str, bool] = {}
    rest: dict[str, Any] = {}
    for field_name, info in request_type.model_fields.items():
        kind = _upload_kind(info.annotation)
        if kind is None:
            rest[field_name] = (info.annotation, info)
        else:
            uploads[field_name] = kind
    if not uploads:
        return {}, None
    for field_name, (annotation, _) in rest.items():
        if typing.get_origin(annotation) in (dict,) or (
                isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ValueError(f"{name}: field {field_name!r} of an upload request must be a "
                             "plain value or a list (it is sent as a query parameter)")
    query = create_model(f"{request_type.__name__}Query", **rest) if rest else None
    return uploads, query


def _upload_kind(annotation: Any) -> bool | None:
    """True for ``list[ImageFile]``, False for ``ImageFile`` (or ``| None``), else None."""
    if annotation is ImageFile:
        return False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args == (ImageFile,):
        return True
    if ImageFile in args and type(None) in args and len(args) == 2:
        return False
    return None


# ---- a plain SWorker: the contract before ModelWorker -------------------------------------

def _plain_worker_declaration(worker_cls: type[SWorker[Any, Any]]) -> Declaration:
    from .worker import ClassifyRequest

    def to_items(request: ClassifyRequest) -> list[ImageInput]:
        return [ImageInput(f.data, f.format, f.width, f.height, request.top_k)
                for f in request.files]

    def to_answer(request: ClassifyRequest, results: list[Any]) -> Any:
        return {"predictions": [{"filename": f.filename, **r}
                                for f, r in zip(request.files, results, strict=True)]}

    answer = predict_response_model(getattr(worker_cls, "output_model", None))
    return Declaration(worker_cls, ClassifyRequest, answer, to_items, to_answer,
                       *_split_uploads(worker_cls.__qualname__, ClassifyRequest), "/predict")


# ---- the route ----------------------------------------------------------------------------

class PoolCalls(typing.Protocol):
    """``SPool`` or ``pool.with_timeout(...)``: what ``execute_all`` submits through."""

    def with_context(self, context: Mapping[str, Any]) -> Any: ...

    async def async_execute(self, *args: Any, **kwargs: Any) -> Any: ...


async def execute_one(pool: PoolCalls, item: Any, label: str) -> Any:
    try:
        return await pool.with_context(task_context()).async_execute(item)
    except InvalidInputError as exc:
        raise ImageRejected(400, f"{label}: {exc}") from None


async def execute_all(pool: PoolCalls, items: Sequence[Any],
                      labels: Sequence[str]) -> list[Any]:
    """Submit each item as its own task (so it can share a batch with other clients'),
    and fail fast: the first error cancels the items of this request still queued."""
    if len(items) == 1:
        return [await execute_one(pool, items[0], labels[0])]
    tasks = [asyncio.ensure_future(execute_one(pool, item, label))
             for item, label in zip(items, labels, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        # Collect the siblings' outcomes so none is reported as "never retrieved".
        await asyncio.gather(*tasks, return_exceptions=True)


async def checked_image(upload: UploadFile, number: int, max_pixels: int) -> ImageFile:
    data = await upload.read()
    label = f"file {number} ({upload.filename})" if upload.filename else f"file {number}"
    header = inspect_image(data, max_pixels=max_pixels, name=label)
    return ImageFile(data, header.format, header.width, header.height, upload.filename, label)


async def run_request(request: Request, decl: Declaration, value: Any,
                      labels: Sequence[str] = (), deadline_s: float | None = None) -> Any:
    """One validated request through the pool: ``to_items``, a task per item, ``to_answer``.

    Shared by ``/predict`` and the Open Inference Protocol (``app.v2``), so both get the same
    pool, batching, limits, deadline (``deadline_s``: the client's ``X-Request-Timeout``, at
    most ``REQUEST_TIMEOUT_S``), disconnect handling and errors. ``labels`` name the items in
    error messages.
    """
    lifetime = request_lifetime(request, deadline_s)
    try:
        items = decl.to_items(value)
    except InvalidInputError as exc:
        raise ImageRejected(400, str(exc)) from None
    if len(labels) != len(items):
        labels = [f"item {n}" for n in range(1, len(items) + 1)]
    if not items:
        return decl.to_answer(value, [])
    state = server_state(request)
    if len(items) > state.settings.queue_size:
        # Its items could never all wait at once: a 503 would have the client retry forever.
        raise ImageRejected(
            413, f"{len(items)} items in one request; at most QUEUE_SIZE="
                 f"{state.settings.queue_size} can wait for a worker: split the request")
    calls = lifetime.pool_calls(state.ready_pool())
    results = await run_for_client(request, execute_all(calls, items, labels))
    return decl.to_answer(value, results)


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


def own_docstring(worker_cls: type[SWorker[Any, Any]]) -> str:
    """The docstring of the worker class or of a user's base class, never the contract's
    (``ModelWorker``'s and ``SWorker``'s are written for developers, not API clients)."""
    for klass in worker_cls.__mro__:
        if klass in (ModelWorker, SWorker):
            break
        if klass.__dict__.get("__doc__"):
            return inspect.cleandoc(klass.__dict__["__doc__"])
    return ""


def add_inference_route(router: APIRouter, decl: Declaration,
                        guards: Sequence[Callable[..., Any]] = ()) -> None:
    """Add ``POST decl.route``, typed by the declaration; ``guards``: dependencies (auth)."""
    answer = TypeAdapter(decl.answer_type)
    uploads, query_model = decl.uploads, decl.query_model
    request_type = decl.request_type
    request_model = (request_type if isinstance(request_type, type)
                     and issubclass(request_type, BaseModel) else None)

    single_fields = [name for name, many in uploads.items() if not many]
    query_fields = [] if query_model is None else [
        info.alias or name for name, info in query_model.model_fields.items()]

    async def answer_request(request: Request, value: Any, labels: list[str],
                             deadline_s: float | None) -> Response:
        result = await run_request(request, decl, value, labels, deadline_s)
        body = answer.dump_json(answer.validate_python(result))
        return Response(body, media_type="application/json")

    async def from_uploads(**params: Any) -> Response:
        request: Request = params.pop(REQUEST_PARAM)
        settings = server_state(request).settings
        query = params.pop(QUERY_PARAM, None)
        deadline_s = params.pop(DEADLINE_PARAM, None)
        given = sum(len(v) if isinstance(v, list) else v is not None for v in params.values())
        if given > settings.max_files:
            raise ImageRejected(
                413, f"{given} files in one request; the limit is {settings.max_files} "
                     "(MAX_FILES)")
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
                checked.append(await checked_image(upload, number, settings.max_image_pixels))
            labels += [image.label for image in checked]
            values[name] = checked if uploads[name] else checked[0]
        try:
            # by_name: the values are keyed by field name, also those the client sent under
            # an alias (FastAPI read ?minSide= into the query model's min_side).
            value = (request_model.model_validate(values, by_name=True)
                     if request_model is not None else values)
        except ValidationError as exc:  # a model validator of the worker's request
            # Without the input: it holds the uploaded images.
            raise RequestValidationError(
                exc.errors(include_url=False, include_input=False)) from None
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
        errors = UPLOAD_ERRORS
    else:
        endpoint = from_json
        parameters.append(inspect.Parameter(
            "body", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[request_type, Body()]))
        errors = JSON_ERRORS
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    doc = own_docstring(decl.worker_cls)
    router.add_api_route(
        decl.route, endpoint, methods=["POST"], response_model=decl.answer_type,
        responses={code: {"model": ErrorBody, "description": text}
                   for code, text in sorted({**_COMMON_ERRORS, **errors}.items())},
        dependencies=[Depends(g) for g in guards], tags=["inference"], name="predict",
        operation_id="predict",
        summary=f"Run {decl.worker_cls.__name__}", description=doc)
