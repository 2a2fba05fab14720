"""Pool errors and rejected uploads -> HTTP answers, all in FastAPI's ``{"detail": ...}``.

The mapping (DESIGN.md): queue full or no worker 503 with ``Retry-After``, deadline 504,
worker crashed 500 (the pool respawns it; the server keeps serving). A worker's
``InvalidImageError`` becomes a 400 naming the file in ``routes.execute_one``.
No traceback ever reaches the client; the log line carries it with the request id.
"""

from __future__ import annotations

import logging
import signal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from stateful_pool.errors import (
    NoWorkersError,
    PoolClosedError,
    QueueFullError,
    RemoteError,
    TaskTimeoutError,
    WorkerCrashedError,
)

from .images import ImageRejected

logger = logging.getLogger("app.errors")

# Seconds a client should wait before retrying a 503: about one batch on a GPU, and short
# enough that a restarting worker is not starved of traffic once it is back.
RETRY_AFTER_S = 1


class NotReadyError(NoWorkersError):
    """No worker can take a task now (loading, restarting); the message is for the client."""


def error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def unavailable(detail: str) -> JSONResponse:
    return error(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


async def _image_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageRejected)
    return error(exc.status_code, exc.detail)


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    return unavailable("the server is at capacity (request queue full); retry later")


async def _no_workers(request: Request, exc: Exception) -> JSONResponse:
    return unavailable("no model worker is ready; retry later")


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return unavailable(str(exc))


async def _closed(request: Request, exc: Exception) -> JSONResponse:
    return unavailable("the server is shutting down")


async def _timeout(request: Request, exc: Exception) -> JSONResponse:
    timeout = request.app.state.settings.request_timeout_s
    return error(504, f"the model did not answer within REQUEST_TIMEOUT_S={timeout:g} s")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WorkerCrashedError)
    how = describe_exit(exc.exitcode)
    logger.error("worker %d (pid %s) crashed under this request: %s, %s",
                 exc.worker_id, exc.pid, how, exc.reason)
    return error(500, f"the model worker crashed while handling this request ({how}); "
                      "it is being restarted, retry the request")


async def _remote(request: Request, exc: Exception) -> JSONResponse:
    logger.error("worker error that could not be rebuilt: %s", exc)
    return error(500, "internal error in the model worker")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; anything else is answered 500 by ``RequestContextMiddleware``."""
    app.add_exception_handler(ImageRejected, _image_rejected)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(NoWorkersError, _no_workers)
    app.add_exception_handler(NotReadyError, _not_ready)
    app.add_exception_handler(PoolClosedError, _closed)
    app.add_exception_handler(TaskTimeoutError, _timeout)
    app.add_exception_handler(WorkerCrashedError, _crashed)
    app.add_exception_handler(RemoteError, _remote)
