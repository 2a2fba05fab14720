"""The worker contract: what a worker file declares, and what crosses the process boundary.

A model is served by one class, a ``ModelWorker`` subclass, in one file:

* a **request** type: the first parameter's annotation of ``to_items``; a pydantic model
  (or any type pydantic validates). Fields typed ``ImageFile`` / ``list[ImageFile]`` are
  multipart uploads, checked in the API process (size, count, pixels, format, bombs); the
  other fields of such a request are query parameters. A request without uploads is a JSON
  body.
* an **answer** type: the return annotation of ``to_answer``; it types the route and
  ``/openapi.json``.
* ``to_items(request) -> list[item]`` and ``to_answer(request, results) -> answer``: class
  methods that run in the API process. Each item becomes one pool task, so the items of one
  request can share a batch with other clients' items.
* ``spawn(config)`` and ``execute_batch(items)``: run in the worker process, as for any
  ``SWorker``; ``config.options`` holds the worker's own settings (``settings_model``).

A worker whose answer is a **stream** (text token by token, audio chunk by chunk, progress)
sets ``chunk_model`` (the type of one chunk) and defines, instead of ``to_items``:

* ``to_stream(request) -> item``: the one pool item of the request's stream (the request type
  is the annotation of its first parameter). Runs in the API process.
* in the worker, either ``execute(item)`` as a generator that yields chunks, or the batched
  trio ``stream_open(item) -> state``, ``stream_step(states) -> [chunk | END_OF_STREAM |
  exception, ...]`` and ``stream_close(state)`` (continuous batching: several streams share
  one step, a new one joins at the next step).
* optionally ``to_answer(request, chunks) -> answer``: the whole answer for a client that did
  not ask for a stream; its return annotation types that answer. Without it the answer is
  ``{"chunks": [...]}``.

An ``InvalidInputError`` raised by ``stream_open`` or before the generator's first chunk is a
400, as for any item.

Kept free of FastAPI and torch so that both sides import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from pydantic_settings import BaseSettings

from stateful_pool import SWorker


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker's ``spawn`` needs; built from the settings, one per worker.

    Attributes:
        worker_index: position of this worker in the pool (0-based), for logs.
        model_name: ``MODEL_NAME``, or the worker's ``default_model`` when unset.
        weights: ``auto``, ``pretrained``, ``random``, ``hf-hub:org/name`` or a checkpoint
            path (``MODEL_WEIGHTS``).
        device: a torch device string, ``cpu`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (half precision only on CUDA;
            ``auto``: bf16 on a GPU that has it, else fp32; ``app.runtime.resolve_precision``).
        num_threads: torch intra-op threads for this worker (CPU only; GPUs use 1).
        max_image_pixels: the decoder's pixel limit, the same one the API process checked.
        log_level: ``LOG_LEVEL`` of the server, for the worker's own log lines.
        max_batch_size: the largest batch the pool hands this worker (``MAX_BATCH_SIZE``),
            for warm-ups that should cover every batch size (``COMPILE=1``).
        options: the worker's own settings, an instance of its ``settings_model`` read from
            the environment in the API process (so a bad value stops the server at start-up);
            None when the worker declares none.
    """

    worker_index: int
    model_name: str
    weights: str
    device: str
    precision: str
    num_threads: int
    max_image_pixels: int
    log_level: str = "info"
    options: Any = None
    max_batch_size: int = 1


@dataclass(frozen=True)
class ImageFile:
    """One uploaded image, checked in the API process from its header (format, size, pixels).

    The type of an upload field in a request model. The bytes are still encoded: decoding
    happens in the worker (``app.images.decode_rgb``), so the API process stays light and a
    corrupt image fails only its own item (``InvalidImageError``).

    Attributes:
        label: how error messages name this upload, e.g. ``file 2 (cat.jpg)``.
    """

    data: bytes
    format: str
    width: int
    height: int
    filename: str | None = None
    label: str = "file"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        # Built by the server from a checked upload; a client can never send one as JSON.
        return core_schema.is_instance_schema(cls)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"type": "string", "format": "binary"}


@dataclass(frozen=True)
class ImageInput:
    """One image of a classification request: the pool item of ``app.worker.ViTWorker``.

    The bytes are still encoded: decoding happens in the worker, so the API process stays
    light and a corrupt image fails only its own item (see ``InvalidImageError``).
    """

    data: bytes
    format: str
    width: int
    height: int
    top_k: int


class InvalidInputError(ValueError):
    """An item passed the API process's checks but the model cannot take it.

    A worker returns an instance in place of that item's result (``execute_batch``) or raises
    it (``execute``); the server answers that request 400, naming the item, and the other
    items of the batch are unaffected.
    """


class InvalidImageError(InvalidInputError):
    """An image passed the header checks but could not be decoded (truncated, corrupt)."""


class ModelWorker(SWorker[dict[str, Any], Any]):
    """Base class of a served model; see the module docstring for the contract.

    Class attributes:
        default_model: the model served when ``MODEL_NAME`` is unset.
        settings_model: a pydantic-settings class with its own ``env_prefix``; the server
            reads it from the environment and hands it to ``spawn`` as ``config.options``.
        route: the path of the inference endpoint.
        chunk_model: set by a worker that streams: the type of one chunk (a pydantic model,
            or any type pydantic validates). The server then answers a request with
            server-sent events, one chunk per event, when the client asks for a stream, and
            with the whole answer otherwise (module docstring).
        task: what the model does, for protocols that serve one kind of model:
            ``"text-generation"`` (a streaming worker whose request has ``prompt`` and/or
            ``messages`` and whose chunks have ``text``, ``tokens``, ``finish_reason`` and
            ``prompt_tokens``, as ``app.examples.causal_lm``) or ``"embedding"`` (a request
            with an ``input`` list of texts, an answer with ``embeddings`` and
            ``prompt_tokens``, as ``app.examples.text_embedder``) put the model on the
            OpenAI routes (``/v1/completions``, ``/v1/chat/completions``,
            ``/v1/embeddings``). ``None`` (default): ``/predict`` and KServe v2 only.
    """

    default_model: ClassVar[str | None] = None
    settings_model: ClassVar[type[BaseSettings] | None] = None
    route: ClassVar[str] = "/predict"
    chunk_model: ClassVar[Any] = None
    task: ClassVar[str | None] = None

    @classmethod
    def to_items(cls, request: Any) -> list[Any]:
        """Split a validated request into pool items. Runs in the API process."""
        raise NotImplementedError(f"{cls.__qualname__} does not define to_items()")

    @classmethod
    def to_stream(cls, request: Any) -> Any:
        """The one pool item of a streaming request (with ``chunk_model`` set): what the
        worker's generator ``execute`` or its ``stream_open`` receives. Runs in the API
        process; an ``InvalidInputError`` here answers 400.
        """
        raise NotImplementedError(f"{cls.__qualname__} does not define to_stream()")

    @classmethod
    def to_answer(cls, request: Any, results: list[Any]) -> Any:
        """Build the answer from one result per item, in order. Runs in the API process.

        For a streaming worker, ``results`` are the stream's chunks, in order: the answer of
        a client that did not ask for a stream.
        """
        raise NotImplementedError(f"{cls.__qualname__} does not define to_answer()")

    def execute(self, item: Any) -> Any:
        """One item through ``execute_batch`` (the pool calls this when batching is off)."""
        [result] = self.execute_batch([item])
        if isinstance(result, BaseException):
            raise result
        return result

    def execute_batch(self, items: list[Any]) -> list[Any]:
        """One result per item, in order; an exception instance fails that item alone.

        Runs in the worker process.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not define execute_batch()")
