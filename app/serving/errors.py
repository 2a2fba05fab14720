"""The serving errors: what a request may be refused with, whatever the protocol.

``ServingError`` carries a status (HTTP numbering, which every protocol maps from), a message
for the client and headers (``Retry-After``); each protocol renders it in its own shape
(``/predict``'s ``{"detail"}``, KServe v2's ``{"error"}``). ``serving_error`` turns what the
pool raises into one:

    queue full                 503, Retry-After from the drain rate (``LoadShedder``)
    no worker ready, closing   503, Retry-After 1
    deadline passed            504
    worker crashed             500 (the pool respawns it; the server keeps serving)
    an upload refused          its status (400, 413, 415)
    the client left            499, recorded only (nobody receives it)

No traceback ever reaches the client; the log line carries it with the request id.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from stateful_pool import PoolStats
from stateful_pool.errors import (
    NoWorkersError,
    PoolClosedError,
    RemoteError,
    WorkerCrashedError,
)

from ..images import ImageRejected
from ..ops.logs import request_id_var

logger = logging.getLogger("app.errors")

# Seconds a client should wait before retrying a 503 when nothing better is known: about one
# batch on a GPU, and short enough that a restarting worker is not starved of traffic.
RETRY_AFTER_S = 1
# Bounds of the Retry-After computed from the drain rate: a client should neither hammer a
# full server nor go away for minutes because of one slow moment.
RETRY_AFTER_MAX_S = 30
# Status recorded (access log, metrics) for a request whose client left before its answer
# (nginx's "client closed request"); nobody receives it.
CLIENT_CLOSED = 499
# After a 503 for a full queue, how long new requests are checked against the queue before
# their body is read (``LoadShedder.refuse_now``).
SHEDDING_S = 1.0

# What each status means, for the API descriptions of every protocol.
MEANINGS = {
    400: "an input the model cannot take, or a request that breaks the protocol (the "
         "message names it)",
    401: "API_KEY is set and the bearer token is missing or wrong",
    404: "no such model: the server serves one model, under its SERVED_MODEL_NAME",
    408: "the request body did not arrive within BODY_TIMEOUT_S of the request's start",
    413: "body over MAX_UPLOAD_MB, more than MAX_FILES files (or QUEUE_SIZE items), or too "
         "many pixels",
    415: "not an image, or a format outside JPEG, PNG, WebP, BMP, GIF",
    422: "the request does not match its schema, or a parameter is out of range",
    500: "the model worker crashed under this request (it is restarted)",
    503: "queue full, no worker ready or shutting down; see Retry-After",
    504: "no answer within the request's deadline (REQUEST_TIMEOUT_S, or shorter if the "
         "client asked)",
}


class ServingError(Exception):
    """A request answered with an error: what every protocol renders in its own shape.

    Attributes:
        status: the HTTP status; other protocols map from it (gRPC codes, an SSE event).
        message: what went wrong, for a human.
        headers: to send with it (``Retry-After``, ``WWW-Authenticate``).
        errors: the itemised problems of a request that failed validation (422), as
            pydantic lists them, else None.
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None,
                 *, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.errors = errors

    def __repr__(self) -> str:
        return f"ServingError({self.status}, {self.message!r})"


class NotReadyError(NoWorkersError):
    """No worker can take a task now (loading, restarting); the message is for the client."""


def unavailable(message: str) -> ServingError:
    """503 with the default Retry-After: the server may serve again soon."""
    return ServingError(503, message, {"Retry-After": str(RETRY_AFTER_S)})


def crashed(exc: WorkerCrashedError) -> ServingError:
    how = exc.how  # "exit code 3", "signal SIGKILL"...
    # The request id in the message itself, not only in the line's context: when one input
    # keeps killing workers, grepping "crashed worker" lists the requests that did it.
    logger.error("request %s crashed worker %d (pid %s), alone or in a batch with others: "
                 "%s, %s", request_id_var.get(), exc.worker_id, exc.pid, how, exc.reason)
    return ServingError(500, f"the model worker crashed while handling this request ({how}); "
                             "it is being restarted, retry the request")


def serving_error(exc: BaseException) -> ServingError | None:
    """The answer to a refusal that needs nothing but the exception, or None.

    A full queue (it needs the drain rate) and a deadline (it needs the request's lifetime)
    are turned into answers by ``ServingCore``.
    """
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ImageRejected):
        return ServingError(exc.status_code, exc.detail)
    if isinstance(exc, NotReadyError):
        return unavailable(str(exc))
    if isinstance(exc, NoWorkersError):
        return unavailable("no model worker is ready; retry later")
    if isinstance(exc, PoolClosedError):
        return unavailable("the server is shutting down")
    if isinstance(exc, WorkerCrashedError):
        return crashed(exc)
    if isinstance(exc, RemoteError):
        logger.error("worker error that could not be rebuilt: %s", exc)
        return ServingError(500, "internal error in the model worker")
    return None


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


class LoadShedder:
    """Refuses requests before their body is read while the queue stays full.

    Each 503 for a full queue (``queue_full``) opens a window of ``SHEDDING_S``; within it
    ``refuse_now`` checks the queue, and a request that would be refused anyway costs no
    upload read, no multipart parse, no image check: under load those made a 503 take
    seconds (docs/BENCHMARKS.md). Outside the window it is one attribute read.
    """

    def __init__(self) -> None:
        self.drain = DrainRate()
        self.shedding_until = 0.0

    def queue_full(self, stats: PoolStats | None) -> ServingError:
        """The 503 of a request the full queue refused; opens the shedding window."""
        self.shedding_until = time.monotonic() + SHEDDING_S
        return self._at_capacity(self.drain.retry_after(stats))

    def refuse_now(self, stats: Callable[[], PoolStats | None], queue_size: int
                   ) -> ServingError | None:
        """The 503 for a new request while shedding and the queue is still full, else None."""
        if time.monotonic() >= self.shedding_until:
            return None
        current = stats()
        if current is None or current.queue_depth < queue_size:
            return None
        return self._at_capacity(self.drain.retry_after(current))

    @staticmethod
    def _at_capacity(seconds: int) -> ServingError:
        return ServingError(503, "the server is at capacity (request queue full); retry in "
                                 f"about {seconds} s", {"Retry-After": str(seconds)})
