"""What a worker class declares, read once: its request and answer types and its uploads.

``declaration_of(worker_cls)`` reads what the worker file declares (``app.contract``): the
request type (the annotation of ``to_items``'s request parameter), the answer type (the return
annotation of ``to_answer``) and which request fields are uploads (``ImageFile``). Every
protocol derives its wire format from it: ``/predict`` its form fields and JSON body, KServe
v2 its tensors.

A streaming worker (``chunk_model`` set) declares its request with ``to_stream`` instead of
``to_items``; its chunk type is ``chunk_model``, and its answer type, for clients that do not
ask for a stream, is the return annotation of its ``to_answer`` or, without one,
``{"chunks": [chunk, ...]}``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from stateful_pool import SWorker

from ..contract import ImageFile, ModelWorker
from .errors import ServingError


@dataclass(frozen=True)
class Declaration:
    """What the server needs to know about a worker class to serve it.

    Attributes:
        uploads: upload field name -> whether it takes several files.
        query_model: the non-upload fields of an upload request (``/predict``'s query
            parameters, KServe v2's request parameters).
        route: the worker's ``/predict`` path (``ModelWorker.route``).
        chunk_type: the type of one chunk (``chunk_model``) of a streaming worker, else None.
        to_stream: the stream's pool item from a request, for a streaming worker, else None.
    """

    worker_cls: type[SWorker[Any, Any]]
    request_type: Any
    answer_type: Any
    to_items: Callable[[Any], list[Any]]
    to_answer: Callable[[Any, list[Any]], Any]
    uploads: dict[str, bool]
    query_model: type[BaseModel] | None
    route: str
    chunk_type: Any = None
    to_stream: Callable[[Any], Any] | None = None

    @property
    def streams(self) -> bool:
        """Whether the worker's answer is a stream of chunks."""
        return self.to_stream is not None


def declaration_of(worker_cls: type[SWorker[Any, Any]]) -> Declaration:
    """Read the request and answer types of a worker class.

    Raises:
        ValueError: not a ``ModelWorker``, or one whose hooks are missing or unannotated,
            or whose request mixes uploads with fields that cannot be query parameters.
    """
    name = worker_cls.__qualname__
    if not issubclass(worker_cls, ModelWorker):
        raise ValueError(f"{name} must subclass app.contract.ModelWorker (it declares the "
                         "request and answer types the server needs)")
    if worker_cls.chunk_model is not None:
        return _stream_declaration(worker_cls)
    if _yields(worker_cls):
        raise ValueError(f"{name} streams (a generator execute() or stream_step()) but sets "
                         "no chunk_model: set it to the type of one chunk")
    for hook in ("to_items", "to_answer"):
        if not _defines(worker_cls, hook):
            raise ValueError(f"{name} must define the class method {hook}()")
    request_type = _request_type(worker_cls, "to_items")
    answer_type = _answer_type(worker_cls)
    uploads = _split_uploads(name, request_type)
    if (worker_cls.execute_batch is ModelWorker.execute_batch
            and worker_cls.execute is ModelWorker.execute):
        raise ValueError(f"{name} must define execute_batch() or execute()")
    return Declaration(worker_cls, request_type, answer_type,
                       worker_cls.to_items, worker_cls.to_answer, *uploads, worker_cls.route)


def _stream_declaration(worker_cls: type[ModelWorker]) -> Declaration:
    name = worker_cls.__qualname__
    if not _yields(worker_cls):
        raise ValueError(
            f"{name} sets chunk_model, so it streams, but defines neither a generator "
            "execute(self, item) that yields chunks nor stream_open/stream_step (continuous "
            "batching)")
    if not _defines(worker_cls, "to_stream"):
        raise ValueError(f"{name} must define the class method to_stream(request) (the "
                         "one pool item of a request's stream)")
    request_type = _request_type(worker_cls, "to_stream")
    chunk_type = worker_cls.chunk_model
    to_answer: Callable[[Any, list[Any]], Any]
    if _defines(worker_cls, "to_answer"):
        answer_type = _answer_type(worker_cls)
        to_answer = worker_cls.to_answer
    else:
        answer_type = create_model(f"{worker_cls.__name__}Chunks",
                                   chunks=(list[chunk_type], ...))  # type: ignore[valid-type]

        def chunks_answer(request: Any, chunks: list[Any]) -> Any:
            return answer_type(chunks=chunks)

        to_answer = chunks_answer

    def to_items(request: Any) -> list[Any]:
        return [worker_cls.to_stream(request)]

    return Declaration(worker_cls, request_type, answer_type, to_items, to_answer,
                       *_split_uploads(name, request_type), worker_cls.route,
                       chunk_type, worker_cls.to_stream)


def _defines(worker_cls: type[ModelWorker], hook: str) -> bool:
    return getattr(worker_cls, hook).__func__ is not getattr(ModelWorker, hook).__func__


def _yields(worker_cls: type[ModelWorker]) -> bool:
    """A generator ``execute`` or a ``stream_step``: the worker's results are streams."""
    return (inspect.isgeneratorfunction(worker_cls.execute)
            or callable(getattr(worker_cls, "stream_step", None)))


def _hints(worker_cls: type[ModelWorker], hook: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(getattr(worker_cls, hook))
    except NameError as exc:
        raise ValueError(f"{worker_cls.__qualname__}: cannot resolve an annotation ({exc}); "
                         "define the request and answer types at module level") from None


def _request_type(worker_cls: type[ModelWorker], hook: str) -> Any:
    """The annotation of the hook's first parameter (the request)."""
    hints = _hints(worker_cls, hook)
    params = list(inspect.signature(getattr(worker_cls, hook)).parameters)
    if not params or params[0] not in hints:
        raise ValueError(f"{worker_cls.__qualname__}.{hook}(request) must annotate its "
                         "request parameter")
    return hints[params[0]]


def _answer_type(worker_cls: type[ModelWorker]) -> Any:
    hints = _hints(worker_cls, "to_answer")
    if "return" not in hints:
        raise ValueError(f"{worker_cls.__qualname__}.to_answer() must annotate its return "
                         "type (the answer)")
    return hints["return"]


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


def validation_error(exc: ValidationError) -> ServingError:
    """422 listing the problems, without the input (it may hold uploaded images)."""
    return ServingError(422, "the request does not match its schema",
                        errors=exc.errors(include_url=False, include_input=False))


def problems(error: ServingError) -> str:
    """The itemised problems of a 422 in one line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                     for e in error.errors or ()) or error.message


def own_docstring(worker_cls: type[SWorker[Any, Any]]) -> str:
    """The docstring of the worker class or of a user's base class, never the contract's
    (``ModelWorker``'s and ``SWorker``'s are written for developers, not API clients)."""
    for klass in worker_cls.__mro__:
        if klass in (ModelWorker, SWorker):
            break
        if klass.__dict__.get("__doc__"):
            return inspect.cleandoc(klass.__dict__["__doc__"])
    return ""
