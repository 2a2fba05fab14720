"""Pool errors and rejected uploads -> HTTP answers, all in FastAPI's ``{"detail": ...}``.

The mapping (DESIGN.md): queue full or no worker 503 with ``Retry-After``, deadline 504,
worker crashed 500 (the pool respawns it; the server keeps serving). A worker's
``InvalidImageError`` becomes a 400 naming the file in ``routes.execute_one``.
No traceback ever reaches the client; the log line carries it with the request id.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from stateful_pool import PoolStats
from stateful_pool.errors import (
    NoWorkersError,
    PoolClosedError,
    QueueFullError,
    RemoteError,
    TaskTimeoutError,
    WorkerCrashedError,
)

from .images import ImageRejected
from .lifetime import CLIENT_CLOSED, RECEIVED_AT, ClientDisconnected

logger = logging.getLogger("app.errors")

# Seconds a client should wait before retrying a 503 when nothing better is known: about one
# batch on a GPU, and short enough that a restarting worker is not starved of traffic.
RETRY_AFTER_S = 1
# Bounds of the Retry-After computed from the drain rate: a client should neither hammer a
# full server nor go away for minutes because of one slow moment.
RETRY_AFTER_MAX_S = 30


class DrainRate:
    """How fast the pool empties its queue, to tell a rejected client when to come back.

    ``retry_after`` samples how many tasks have left the pool (done, failed, cancelled,
    timed out) each time it is asked, at most every 0.2 s, over the last 10 s; the answer is
    the queue depth over that rate, rounded up and bounded. Sampled only when a 503 is
    answered, so it costs nothing while the server keeps up. Before two samples span
    0.5 s, the rate is estimated from the workers' mean run time and batch size.
    """

    WINDOW_S = 10.0
    EVERY_S = 0.2
    MIN_SPAN_S = 0.5

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, stats: PoolStats, now: float) -> float | None:
        """Tasks leaving the pool per second, or None when nothing is known yet."""
        left = stats.completed + stats.failed + stats.cancelled + stats.timed_out
        if not self._samples or now - self._samples[-1][0] >= self.EVERY_S:
            self._samples.append((now, left))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        first_t, first_left = self._samples[0]
        if now - first_t >= self.MIN_SPAN_S and left > first_left:
            return (left - first_left) / (now - first_t)
        run = stats.run_time
        if run.count == 0 or run.sum <= 0 or stats.live_workers == 0:
            return None
        per_batch = max(1.0, stats.batch_size_mean)
        return stats.live_workers * per_batch / (run.sum / run.count)

    def retry_after(self, stats: PoolStats | None) -> int:
        if stats is None:
            return RETRY_AFTER_S
        rate = self.rate(stats, time.monotonic())
        if rate is None or rate <= 0:
            return RETRY_AFTER_S
        seconds = math.ceil(stats.queue_depth / rate)
        return max(RETRY_AFTER_S, min(RETRY_AFTER_MAX_S, seconds))


class NotReadyError(NoWorkersError):
    """No worker can take a task now (loading, restarting); the message is for the client."""


def error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def unavailable(detail: str) -> JSONResponse:
    return error(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


async def _image_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageRejected)
    return error(exc.status_code, exc.detail)


# After a 503 for a full queue, how long new POSTs are checked against the queue before
# their body is read (``middleware.shed_now``).
SHEDDING_S = 1.0


def drain_rate(app_state: State) -> DrainRate:
    drain: DrainRate | None = getattr(app_state, "drain_rate", None)
    if drain is None:
        drain = app_state.drain_rate = DrainRate()
    return drain


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    request.app.state.shedding_until = time.monotonic() + SHEDDING_S
    seconds = drain_rate(request.app.state).retry_after(request.app.state.server.pool_stats())
    return error(503, "the server is at capacity (request queue full); retry in about "
                      f"{seconds} s", {"Retry-After": str(seconds)})


def json_safe(value: Any) -> Any:
    """``value`` with its non-finite floats as strings (``"NaN"``, ``"Infinity"``).

    Python's json module parses ``NaN`` and ``Infinity`` in a request body, but strict JSON
    has no such values: an error answer that echoes them back could not be encoded.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, but always encodable: the errors echo the client's input."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, 422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer, except for what its "error parsing the body" 400 hides: a client
    that left while sending its body (a 499 like any client that leaves, not a bad request
    nobody sent), and a JSON body that is not UTF-8 (said so)."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):
        request.app.state.metrics.abandoned.inc()
        waited = time.monotonic() - request.scope.get(RECEIVED_AT, time.monotonic())
        logger.info("client disconnected after %.0f ms, while sending its request body",
                    waited * 1000)
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return error(400, f"the request body is not valid UTF-8: {exc.__cause__}")
    return await http_exception_handler(request, exc)


async def _no_workers(request: Request, exc: Exception) -> JSONResponse:
    return unavailable("no model worker is ready; retry later")


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return unavailable(str(exc))


async def _closed(request: Request, exc: Exception) -> JSONResponse:
    return unavailable("the server is shutting down")


async def _timeout(request: Request, exc: Exception) -> JSONResponse:
    request.app.state.metrics.expired.inc()
    lifetime = getattr(request.state, "lifetime", None)
    if lifetime is None:
        timeout = request.app.state.settings.request_timeout_s
        return error(504, f"the model did not answer within REQUEST_TIMEOUT_S={timeout:g} s")
    return error(504, f"the model did not answer within the request's deadline of "
                      f"{lifetime.describe()}; its unstarted work was dropped")


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads it (uvicorn drops what is sent after a disconnect); the status is for the
    # access log and the metrics.
    return Response(status_code=CLIENT_CLOSED)


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WorkerCrashedError)
    how = exc.how  # "exit code 3", "signal SIGKILL"...
    logger.error("worker %d (pid %s) crashed under this request: %s, %s",
                 exc.worker_id, exc.pid, how, exc.reason)
    return error(500, f"the model worker crashed while handling this request ({how}); "
                      "it is being restarted, retry the request")


async def _remote(request: Request, exc: Exception) -> JSONResponse:
    logger.error("worker error that could not be rebuilt: %s", exc)
    return error(500, "internal error in the model worker")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; anything else is answered 500 by ``RequestContextMiddleware``."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ImageRejected, _image_rejected)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(NoWorkersError, _no_workers)
    app.add_exception_handler(NotReadyError, _not_ready)
    app.add_exception_handler(PoolClosedError, _closed)
    app.add_exception_handler(TaskTimeoutError, _timeout)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(WorkerCrashedError, _crashed)
    app.add_exception_handler(RemoteError, _remote)
