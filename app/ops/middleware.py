"""Pure ASGI middleware: request ids, access log and metrics, load shedding, and the upload
size and time limits, in one layer (each ASGI layer costs every request a call and a closure).

Pure ASGI rather than ``BaseHTTPMiddleware`` so that the body streams through untouched and
an error raised while the body is read still gets an answer with the request id. The errors
answered here (a body over the limit, load shedding, shutdown, an unhandled error) are
rendered by the protocol that owns the path, as the routes' own errors are.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..serving.errors import ServingError
from .logs import request_id_var
from .metrics import Metrics

logger = logging.getLogger("app.access")

# Where RequestContextMiddleware notes when the request arrived (time.monotonic()): the
# deadline counts from there, so reading a slow upload spends the request's budget too.
RECEIVED_AT = "app.received_at"
# Where a streamed answer leaves its stream (``app.serving.streams.OpenStream``): the access
# line records how many chunks the client got and whether it left before the end.
STREAM = "app.stream"
# A client's id is echoed into headers and logs: keep it short and free of separators.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Probes and scrapers hit these every few seconds; their lines would drown the rest.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# ``path -> render``: the error answer in the shape of the protocol that owns the path
# (``app.protocols.renderer_for``); a response is an ASGI app.
RenderFor = Callable[[str], Callable[[ServingError], ASGIApp]]


# Request ids: a random per-process prefix and a counter, not uuid4() per request:
# os.urandom is a syscall that also drops the GIL, and getting it back behind the dispatcher
# thread costs more than the call (docs/BENCHMARKS.md).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def freeze_heap() -> None:
    """Move every object alive after start-up out of the garbage collector's sight.

    Under load the collector's oldest generation runs about once a second, and each run walks
    every object of the process: with the app, FastAPI, pydantic and their schemas loaded,
    those pauses were the server's p99 latency spikes (docs/BENCHMARKS.md). Frozen objects are
    never walked again (they were going to live as long as the process anyway).
    """
    gc.collect()
    gc.freeze()


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _id_and_length(scope: Scope) -> tuple[bytes | None, bytes | None]:
    """The ``X-Request-ID`` and ``Content-Length`` headers (their first values), in one pass."""
    client_id = length = None
    for key, value in scope["headers"]:
        if key == b"content-length":
            if length is None:
                length = value
        elif key == b"x-request-id" and client_id is None:
            client_id = value
    return client_id, length


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` or a new one), echoes it on
    the response, sets it for log lines, writes one access-log line, records the metrics,
    sheds load before a body is read, enforces the body's size and time limits
    (``max_bytes``, ``body_timeout``: see ``_limited``), and answers any unhandled error 500
    in JSON (the traceback goes to the log only)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: Callable[[], set[str]],
                 render_for: RenderFor, refuse_now: Callable[[str], ServingError | None],
                 reserve: Callable[[str], AbstractContextManager[None]] = (
                     lambda path: nullcontext()),
                 max_bytes: int | None = None, body_timeout: float = 30.0):
        self.app = app
        self.reserve = reserve
        self.metrics = metrics
        self.known_paths = known_paths
        self.render_for = render_for
        self.refuse_now = refuse_now
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._freeze_after_startup(send)
            await self.app(scope, receive, send)
            return
        client_id, declared = _id_and_length(scope)
        request_id = new_request_id()
        if client_id is not None:
            text = client_id.decode("latin-1")
            if _CLIENT_ID.fullmatch(text):
                request_id = text
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        scope[RECEIVED_AT] = received_at = time.monotonic()
        status = 500
        response_started = False
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                # What MutableHeaders(scope=message).append does, without building one.
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        async def answer(error: ServingError) -> None:
            await self.render_for(scope["path"])(error)(scope, receive, send_with_id)

        metrics = self.metrics
        metrics.in_progress.inc()
        try:
            # Load shedding: a POST that would be refused once read (it cannot finish in
            # time, or the queue stays full) is refused before its body is read
            # (``LoadShedder``).
            if scope["method"] != "POST":
                await self._limited(scope, receive, send_with_id, declared, received_at)
            elif (refused := self.refuse_now(scope["path"])) is not None:
                await answer(refused)
            else:
                # Counted from now, while its body is read: the next ones see it ahead.
                with self.reserve(scope["path"]):
                    await self._limited(scope, receive, send_with_id, declared, received_at)
        except asyncio.CancelledError:
            # Only uvicorn cancels a request task: on shutdown, once SHUTDOWN_TIMEOUT_S has
            # passed (a client that leaves is handled by its lifetime, without a cancel).
            # Answer in the protocol's shape rather than let uvicorn answer a bare 500 and
            # log a traceback; then end quietly, as the cancel asked.
            if response_started:
                raise
            metrics.refused_by("shutting_down")
            await answer(ServingError(
                503, "the server is shutting down and this request did not finish within "
                     "SHUTDOWN_TIMEOUT_S; retry it", {"Retry-After": "1", "Connection": "close"}))
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            await answer(ServingError(500, "internal server error"))
        finally:
            metrics.in_progress.dec()
            seconds = time.perf_counter() - started
            metrics.observe(scope["method"], self._route_label(scope), status, seconds)
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            # The line's arguments are built only when it is written (LOG_LEVEL=warning skips
            # every access line).
            if logger.isEnabledFor(level):
                logger.log(level, '"%s %s" %d %.1f ms%s', scope["method"], scope["path"],
                           status, seconds * 1000, stream_note(scope),
                           extra=access_fields(scope, status, seconds))
            request_id_var.reset(token)

    # ---- the body's limits ------------------------------------------------------------------

    async def _limited(self, scope: Scope, receive: Receive, send: Send,
                       declared: bytes | None, received_at: float) -> None:
        """Refuses request bodies over ``max_bytes`` with 413, declared or chunked, and bodies
        that have not arrived ``body_timeout`` seconds after the request's start with 408.

        A declared ``Content-Length`` over the limit is refused before a byte is read; a
        chunked body is counted as it streams and refused as soon as it passes the limit, so
        an upload never costs more than ``max_bytes`` of memory or disk. A client that sends
        a request's head and then stalls is answered 408 and its connection closed: without
        a limit, a few thousand such clients would hold as many sockets for good.
        """
        if self.max_bytes is None:
            await self.app(scope, receive, send)
            return
        refused = None
        if declared is not None and not declared.isdigit():
            refused = ServingError(400, "invalid Content-Length header")
        elif declared is not None and int(declared) > self.max_bytes:
            refused = ServingError(413, _too_large(self.max_bytes))
        if refused is not None:
            await self.render_for(scope["path"])(refused)(scope, receive, send)
            return
        limits = _BodyLimits(receive, self.max_bytes, received_at + self.body_timeout,
                             self.body_timeout)
        try:
            await self.app(scope, limits.receive, send)
        finally:
            limits.close()

    @staticmethod
    def _freeze_after_startup(send: Send) -> Send:
        async def send_then_freeze(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                freeze_heap()
            await send(message)

        return send_then_freeze

    def _route_label(self, scope: Scope) -> str:
        """The route template, never the raw path: raw paths would explode label cardinality."""
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        return scope["path"] if scope["path"] in self.known_paths() else "other"


def access_fields(scope: Scope, status: int, seconds: float) -> dict[str, object]:
    """The access line's fields, for LOG_FORMAT=json (the text line ignores them)."""
    fields: dict[str, object] = {"method": scope["method"], "path": scope["path"],
                                 "status": status, "duration_ms": round(seconds * 1000, 3)}
    stream = scope.get(STREAM)
    if stream is not None:
        fields["stream_chunks"] = stream.chunks
        fields["client_left"] = stream.client_left
        if stream.error is not None:
            fields["stream_error"] = stream.error.status
    return fields


def stream_note(scope: Scope) -> str:
    """`` (stream: 12 chunks, client left)`` for a streamed answer, else nothing."""
    stream = scope.get(STREAM)
    if stream is None:
        return ""
    notes = [f"stream: {stream.chunks} chunks"]
    if stream.error is not None:
        notes.append(f"ended by error {stream.error.status}")
    if stream.client_left:
        notes.append("client left")
    return f" ({', '.join(notes)})"


def _too_large(max_bytes: int) -> str:
    return f"request body over the limit of {max_bytes / 2**20:g} MiB (MAX_UPLOAD_MB)"


class _BodyLimits:
    """A request's ``receive`` that counts the body against ``max_bytes`` (413) and gives it
    until ``deadline`` (``time.monotonic()``, the event loop's clock) to arrive (408).

    One timer per request, set at the first read of the body and cancelled once it is
    complete, rather than a timeout around every read: when it fires while a read waits, it
    cancels the reading task, and that read raises the 408 (as ``asyncio.timeout`` does,
    but without a timeout object and a timer per read).
    """

    __slots__ = ("_receive", "_max_bytes", "_deadline", "_seconds", "_received", "_complete",
                 "_timer", "_reader", "_expired")

    def __init__(self, receive: Receive, max_bytes: int, deadline: float,
                 seconds: float) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._seconds = seconds
        self._received = 0
        self._complete = False
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[Any] | None = None  # the task waiting in a read, if any
        self._expired = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        if self._reader is not None:
            self._reader.cancel()

    def _late(self) -> HTTPException:
        # Raised inside the body parser, as the 413 below: the app renders it by path.
        return HTTPException(408, (
            f"the request body did not arrive within {self._seconds:g} s of the request's "
            "start (BODY_TIMEOUT_S)"), {"Connection": "close"})

    async def receive(self) -> Message:
        if self._complete:  # past the body, receive() waits for a disconnect: no limit there
            return await self._receive()
        if self._expired:
            raise self._late()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expire)
        reader = self._reader = asyncio.current_task()
        assert reader is not None
        cancelling = reader.cancelling()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # Our timer's cancel, and no other (uvicorn's, on shutdown): the 408.
            if self._expired and reader.uncancel() <= cancelling:
                raise self._late() from None
            raise
        finally:
            self._reader = None
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self._complete = not message.get("more_body", False)
            if self._received > self._max_bytes:
                # Raised inside the body parser: FastAPI re-raises an HTTPException as is
                # (anything else it would answer 400); the app renders it by path.
                raise HTTPException(413, _too_large(self._max_bytes))
        else:
            self._complete = True
        if self._complete:
            self.close()
        return message
