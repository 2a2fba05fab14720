"""The serving core: one request path for every protocol, and no wire format in it.

A protocol (``app.protocols``) parses its wire format into the worker's request value, then
calls the core; the core answers with the worker's answer value or raises ``ServingError``,
which the protocol renders in its own shape::

    protocol: parse -> core.model(name) -> model.validate(values) -> core.lifetime(...)
    core.infer(model, value, lifetime, labels):
        to_items(value)                       400 if the worker refuses the request
        the items fit the queue?              413 (a 503 would have the client retry forever)
        a worker ready?                       503
        can it finish before its deadline?    503 with Retry-After (``LoadShedder.admit``)
        one pool task per item, each with     503 queue full, 504 deadline, 500 crash,
          the time left, while the client       400 an item the model cannot take,
          is connected                          499 the client left
        to_answer(value, results)
    protocol: serialise the answer, or render the ServingError

A streaming worker's request takes ``core.stream`` instead (``app.serving.streams``): the same
checks and refusals until its first chunk, then an ``OpenStream`` of chunks that the protocol
relays, with an error after the first chunk as its last item. ``core.infer`` on a streaming
worker collects the stream's chunks into ``to_answer``: the answer of a client that did not
ask for a stream.

Time limits of a stream: the request's deadline (``REQUEST_TIMEOUT_S``, or the client's
shorter one) bounds the wait for its first chunk, as it bounds any answer;
``STREAM_CHUNK_TIMEOUT_S`` the time between two chunks; ``STREAM_TIMEOUT_S`` the whole
stream. Collected into one answer, the stream is bounded by the request's deadline.

No web framework here: a gRPC server could call the core as the HTTP protocols do. The
checks every protocol makes before it has a request value (upload checks, the file count,
liveness, readiness, load shedding) are here too, so they read the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from stateful_pool import QueueFullError, TaskTimeoutError

from ..contract import ImageFile, InvalidInputError
from ..images import ImageRejected, inspect_image
from ..ops.metrics import Metrics
from ..ops.tracing import task_context
from ..settings import Settings
from .declaration import Declaration, validation_error
from .errors import (
    CLIENT_CLOSED,
    ServingError,
    refusal_reason,
    serving_error,
    unavailable,
)
from .lifetime import ClientDisconnected, Lifetime
from .state import ModelState, ServerState
from .streams import ChunkMismatch, OpenStream

logger = logging.getLogger("app.lifetime")


@dataclass
class ServedModel:
    """One served model, as the protocols see it.

    Attributes:
        name: what clients call it (``SERVED_MODEL_NAME``): the ``{name}`` of the KServe v2
            routes; never holds a slash.
        model_name: what the workers load (``MODEL_NAME``): a hub id or a path may hold
            slashes.
        declaration: its request and answer types (``app.serving.declaration``).
    """

    name: str
    model_name: str
    declaration: Declaration
    request_adapter: TypeAdapter[Any] = field(init=False, repr=False)
    answer_adapter: TypeAdapter[Any] = field(init=False, repr=False)
    chunk_adapter: TypeAdapter[Any] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.request_adapter = TypeAdapter(self.declaration.request_type)
        self.answer_adapter = TypeAdapter(self.declaration.answer_type)
        chunk_type = self.declaration.chunk_type
        self.chunk_adapter = None if chunk_type is None else TypeAdapter(chunk_type)

    @property
    def task(self) -> str | None:
        """What the model does (``ModelWorker.task``): which task protocols serve it."""
        return getattr(self.declaration.worker_cls, "task", None)

    @property
    def request_fields(self) -> frozenset[str]:
        """The names (and aliases) of the fields of its request, when it is a pydantic model:
        the parameters a protocol may hand it by name."""
        fields = getattr(self.declaration.request_type, "model_fields", {})
        return frozenset(fields) | frozenset(f.alias for f in fields.values() if f.alias)

    def validate(self, values: Any) -> Any:
        """The worker's request value from plain values keyed by field name (an alias works).

        Raises:
            ServingError: 422, listing the problems (``errors``) without the input.
        """
        try:
            return self.request_adapter.validate_python(values, by_name=True)
        except ValidationError as exc:
            raise validation_error(exc) from None


class ServingCore:
    """The request path every protocol shares; one per app.

    Args:
        state: the pool and what the server knows about its workers.
        models: the served models (one today; ``model(name)`` finds one by its name).
        metrics: counts the requests refused (by reason), those that expire and those whose
            client leaves.
    """

    def __init__(self, state: ServerState, models: Sequence[ServedModel],
                 metrics: Metrics) -> None:
        self.state = state
        self.models = tuple(models)
        self.metrics = metrics
        self._by_name = {model.name: model for model in self.models}
        self.default = self._by_name.get(state.default, self.models[0])
        # POST paths that name their model before the body is read, for the refusals made
        # before it is (``refuse_now``, ``reserve``).
        self._path_models: dict[str, str] = {}
        for model in self.models:
            for path in (f"/models/{model.name}/predict", f"/v2/models/{model.name}/infer",
                         f"/v2/models/{model.name}/versions/1/infer"):
                self._path_models[path] = model.name
        self._path_models[self.default.declaration.route] = self.default.name

    @property
    def settings(self) -> Settings:
        """The server's settings (each model's own: ``model_settings``)."""
        return self.state.settings

    def state_of(self, model: ServedModel) -> ModelState:
        """The model's current state: its pool, settings and admission (a reload replaces
        it; a request takes it once, when it starts)."""
        return self.state.models[model.name]

    def model_settings(self, model: ServedModel) -> Settings:
        return self.state_of(model).settings

    # ---- before a request value exists ------------------------------------------------------

    def model(self, name: str) -> ServedModel:
        """The model served under ``name``.

        Raises:
            ServingError: 404 naming the models this server serves.
        """
        model = self._by_name.get(name)
        if model is None:
            served = ", ".join(repr(m.name) for m in self.models)
            raise ServingError(404, f"unknown model {name!r}; this server serves {served}")
        return model

    def lifetime(self, received_at: float | None = None,
                 client_limits: Mapping[str, float | None] | None = None,
                 client_gone: Callable[[], Awaitable[Any]] | None = None) -> Lifetime:
        """A request's deadline (``REQUEST_TIMEOUT_S`` or a client's shorter limit, keyed by
        how the client said it) and how to know the client has gone."""
        models = self.state.models
        limit = (self.state.main.settings.request_timeout_s if len(models) == 1 else
                 max(m.settings.request_timeout_s for m in models.values()))
        return Lifetime.of(float(limit), received_at, client_limits, client_gone)

    def check_file_count(self, count: int) -> None:
        """Raises ServingError 413 when a request carries more files than ``MAX_FILES``."""
        if count > self.settings.max_files:
            raise ServingError(413, f"{count} files in one request; the limit is "
                                    f"{self.settings.max_files} (MAX_FILES)")

    def check_upload(self, data: bytes, label: str, filename: str | None = None) -> ImageFile:
        """An uploaded image checked from its header (format, size, pixels), not decoded.

        Raises:
            ServingError: 400 empty or broken, 413 too many pixels, 415 not an allowed image.
        """
        try:
            header = inspect_image(data, max_pixels=self.settings.max_image_pixels, name=label)
        except ImageRejected as exc:
            raise ServingError(exc.status_code, exc.detail) from None
        return ImageFile(data, header.format, header.width, header.height, filename, label)

    def liveness(self) -> ServingError | None:
        """503 when the server can never serve again, else None."""
        reason = self.state.unrecoverable_reason()
        return ServingError(503, reason) if reason else None

    def readiness(self, model: ServedModel | None = None) -> ServingError | None:
        """503 with Retry-After until every model (or ``model``) has a worker that can take
        a task, else None."""
        if model is not None:
            state = self.state_of(model)
            return None if state.worker_counts()[0] else unavailable(state.not_ready_reason())
        reason = self.state.not_ready()
        return None if reason is None else unavailable(reason)

    def _model_of_path(self, path: str) -> ModelState | None:
        if len(self.models) == 1:
            return self.state.main
        name = self._path_models.get(path)
        return None if name is None else self.state.models[name]

    def refuse_now(self, path: str) -> ServingError | None:
        """503 for a request that would be refused once read (it could not finish before
        ``REQUEST_TIMEOUT_S``, or the queue stays full), before its body is read
        (``LoadShedder``); None otherwise, at the cost of some arithmetic. ``path``: the
        request's, which names its model (a path that does not is never refused here)."""
        state = self._model_of_path(path)
        if state is None:
            return None
        settings = state.settings
        return state.shedder.refuse_now(settings.queue_size, float(settings.request_timeout_s))

    def reserve(self, path: str) -> AbstractContextManager[None]:
        """Count the request at ``path`` as one item ahead of those that arrive while its
        body is read (``LoadShedder.reserve``)."""
        state = self._model_of_path(path)
        return nullcontext() if state is None else state.shedder.reserve()

    def client_left(self, received_at: float | None, during: str) -> ServingError:
        """Count and log a client that left before its answer (``during``: what it left, as
        the end of the log line); the 499 to record."""
        waited = time.monotonic() - (received_at or time.monotonic())
        self.metrics.abandoned.inc()
        logger.info("client disconnected after %.0f ms%s", waited * 1000, during)
        return ServingError(CLIENT_CLOSED, "the client closed the connection")

    # ---- the request ------------------------------------------------------------------------

    async def infer(self, model: ServedModel, value: Any, lifetime: Lifetime,
                    labels: Sequence[str] = ()) -> Any:
        """One validated request through the pool: ``to_items``, a task per item, ``to_answer``.

        Args:
            model: the served model (``model(name)``).
            value: the worker's request value (``model.validate``).
            lifetime: its deadline and disconnect watch (``lifetime(...)``).
            labels: names of the items in error messages (``file 2 (cat.jpg)``); default
                ``item N``.

        Returns:
            the worker's answer value (``to_answer``), for the protocol to serialise.

        Raises:
            ServingError: every refusal the server knows (module docstring); any other
                exception is a bug in the worker's hooks or the server, for the caller to
                log and answer 500.
        """
        decl = model.declaration
        if decl.streams:
            return decl.to_answer(value, await self._collect(model, value, lifetime))
        state = self.state_of(model)
        settings = state.settings
        lifetime = lifetime.at_most(settings.request_timeout_s)
        try:
            items = decl.to_items(value)
        except InvalidInputError as exc:
            raise ServingError(400, str(exc)) from None
        if len(labels) != len(items):
            labels = [f"item {n}" for n in range(1, len(items) + 1)]
        if not items:
            return decl.to_answer(value, [])
        if len(items) > settings.queue_size:
            # Its items could never all wait at once: a 503 would have the client retry forever.
            raise ServingError(
                413, f"{len(items)} items in one request; at most QUEUE_SIZE="
                     f"{settings.queue_size} can wait for a worker: split the request")
        shedder = state.shedder
        try:
            pool = state.ready_pool()
            refused = shedder.admit(len(items), lifetime.remaining(), lifetime.describe())
            if refused is not None:
                raise refused
            calls = lifetime.pool_calls(pool)
            with state.use(), shedder.hold(len(items)):
                results = await lifetime.while_connected(execute_all(calls, items, labels))
        except ClientDisconnected:
            raise self.client_left(lifetime.received_at, "; the request's queued tasks were "
                                                         "withdrawn") from None
        except QueueFullError:
            raise shedder.queue_full() from None
        except TaskTimeoutError:
            self.metrics.expired.inc()
            raise ServingError(504, f"the model did not answer within the request's deadline "
                                    f"of {lifetime.describe()}; its unstarted work was "
                                    "dropped") from None
        except Exception as exc:
            error = serving_error(exc)
            if error is None:
                raise
            reason = refusal_reason(exc)
            if reason is not None:
                self.metrics.refused_by(reason)
            raise error from None
        return decl.to_answer(value, results)

    async def stream(self, model: ServedModel, value: Any, lifetime: Lifetime) -> OpenStream:
        """One validated request of a streaming worker, up to its first chunk.

        Args:
            model: the served model; its worker streams (``declaration.streams``).
            value: the worker's request value (``model.validate``).
            lifetime: its deadline and disconnect watch.

        Returns:
            the open stream, its first chunk in hand (none if the stream ended without one):
            iterate it for the chunks and close it (``async with``); an error after the
            first chunk comes as its last item, a ``ServingError``.

        Raises:
            ServingError: what ``infer`` raises, until the first chunk.
        """
        return await self._open(model, value, lifetime, whole=False)

    async def _collect(self, model: ServedModel, value: Any, lifetime: Lifetime) -> list[Any]:
        """Every chunk of the request's stream, for ``to_answer``; an error raises."""
        async with await self._open(model, value, lifetime, whole=True) as chunks:
            collected = [chunk async for chunk in chunks]
            if chunks.client_left:  # counted and logged as the stream closes
                raise ServingError(CLIENT_CLOSED, "the client closed the connection")
        if collected and isinstance(collected[-1], ServingError):
            raise collected[-1]
        return collected

    async def _open(self, model: ServedModel, value: Any, lifetime: Lifetime, *,
                    whole: bool) -> OpenStream:
        """Submit the stream and wait for its first chunk; ``whole``: the request's deadline
        bounds the whole stream (its chunks are collected into one answer)."""
        decl = model.declaration
        assert decl.to_stream is not None and model.chunk_adapter is not None
        try:
            item = decl.to_stream(value)
        except InvalidInputError as exc:
            raise ServingError(400, str(exc)) from None
        state = self.state_of(model)
        settings = state.settings
        lifetime = lifetime.at_most(settings.request_timeout_s)
        first_s = lifetime.remaining()
        total_s = first_s if whole else (
            lifetime.received_at + settings.stream_timeout_s - time.monotonic())
        # The stream holds its model's pool until it closes (a reload waits for it).
        use = state.use()
        use.__enter__()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                use.__exit__(None, None, None)

        def closed(stream: OpenStream) -> None:
            release()
            self._stream_closed(stream)

        def refusal(exc: BaseException, started: bool) -> ServingError | None:
            return self._stream_refusal(state, exc, started, lifetime, ends_at, whole)

        ends_at = 0.0
        try:
            try:
                if min(first_s, total_s) <= 0:
                    raise TaskTimeoutError("the request's deadline passed before its stream "
                                           "was submitted")
                calls = state.ready_pool().with_timeout(total_s).with_stream_timeouts(
                    first_chunk_timeout=None if whole else first_s,
                    chunk_timeout=settings.stream_chunk_timeout).with_context(task_context())
                source = calls.async_stream(item)
            except Exception as exc:
                raise refusal(exc, False) or exc from None
            ends_at = time.monotonic() + total_s
            opened = OpenStream(source, lifetime, model.chunk_adapter, refusal, closed)
            try:
                await opened.open()
            except ClientDisconnected:
                raise self.client_left(lifetime.received_at, "; its stream was withdrawn "
                                                             "before its first chunk") from None
        except BaseException:
            release()
            raise
        if opened.first_chunk_s is not None:
            self.metrics.first_chunk.observe(opened.first_chunk_s)
        return opened

    def _stream_refusal(self, state: ModelState, exc: BaseException, started: bool,
                        lifetime: Lifetime, ends_at: float, whole: bool) -> ServingError | None:
        """What ended a stream, as the client should read it; ``started``: after its first
        chunk (an error event then, the status has gone out); ``ends_at``: when its time
        was up; ``whole``: collected into one answer."""
        if isinstance(exc, InvalidInputError):
            return ServingError(400, str(exc))
        if isinstance(exc, QueueFullError):
            return state.shedder.queue_full()
        if isinstance(exc, TaskTimeoutError):
            self.metrics.expired.inc()
            if not started:
                return ServingError(504, "the model did not start its answer within the "
                                         f"request's deadline of {lifetime.describe()}; the "
                                         "stream was dropped")
            settings = state.settings
            # The pool's timer fires at the limit, or a hair after it.
            if time.monotonic() < ends_at - 0.01:
                why = (f"wrote no chunk for STREAM_CHUNK_TIMEOUT_S="
                       f"{settings.stream_chunk_timeout:g} s")
            elif whole:
                return ServingError(504, "the model did not finish its answer within the "
                                         f"request's deadline of {lifetime.describe()}; it "
                                         "was stopped")
            else:
                why = f"lasted STREAM_TIMEOUT_S={settings.stream_timeout_s:g} s"
            return ServingError(504, f"the stream {why}; it was stopped")
        if isinstance(exc, ChunkMismatch):
            logger.error("%s", exc)
            return ServingError(500, str(exc))
        return serving_error(exc)

    def _stream_closed(self, stream: OpenStream) -> None:
        if not stream.started:
            return
        self.metrics.stream_chunks.observe(stream.chunks)
        if stream.client_left:
            self.client_left(stream.lifetime.received_at, f" after {stream.chunks} chunks; "
                             "its stream was stopped in the worker")


async def execute_one(pool: Any, item: Any, label: str) -> Any:
    try:
        return await pool.with_context(task_context()).async_execute(item)
    except InvalidInputError as exc:
        raise ServingError(400, f"{label}: {exc}") from None


async def execute_all(pool: Any, items: Sequence[Any], labels: Sequence[str]) -> list[Any]:
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
