"""The serving errors: what a request may be refused with, whatever the protocol.

``ServingError`` carries a status (HTTP numbering, which every protocol maps from), a message
for the client and headers (``Retry-After``); each protocol renders it in its own shape
(``/predict``'s ``{"detail"}``, KServe v2's ``{"error"}``). ``serving_error`` turns what the
pool raises into one:

    cannot finish in time      503, Retry-After from the drain rate (``LoadShedder.admit``)
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
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar
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
    404: "no such model: the message names the models the server serves",
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


# Admission keeps this much headroom (the default of ``ADMISSION_HEADROOM``) between a
# request's estimated finish and its deadline: under steady overload every admitted request
# sits at the edge of the rule, so without it a rate a few percent slower than measured
# would turn many of them into 504s. On shared CPUs the rate moved by a quarter between
# seconds (docs/BENCHMARKS.md).
ADMISSION_HEADROOM = 1.5
# Refusal reasons counted in ``http_requests_refused_total{reason}``.
QUEUE_FULL, DEADLINE, NOT_READY, SHUTTING_DOWN, SHED = (
    "queue_full", "deadline", "not_ready", "shutting_down", "shed")


def refusal_reason(exc: BaseException) -> str | None:
    """The ``http_requests_refused_total`` reason of a pool refusal that ``serving_error``
    answers 503, or None."""
    if isinstance(exc, NoWorkersError):  # NotReadyError included
        return NOT_READY
    if isinstance(exc, PoolClosedError):
        return SHUTTING_DOWN
    return None


# Items a request already counts in ``LoadShedder.in_flight`` from before its body was read
# (``LoadShedder.reserve``), so ``hold`` does not count them twice.
_reserved: ContextVar[int] = ContextVar("reserved", default=0)


class DrainRate:
    """How many tasks the pool can finish per second: what one worker finishes per second
    of its running time, times the workers serving now.

    Measured from ``pool.stats()``, sampled at most every 0.2 s when asked (so it costs
    nothing while nobody asks), over the last 5 s: the tasks that ran, the batches they ran
    in and their run time give one worker's rate while it runs (``tasks * batch size / run
    time``, each task of a batch recording the batch's time). Not the tasks that left the
    pool per second: that is the load, not the capacity, whenever the server keeps up, and
    a rate measured while admission held the load back would hold it back for good. A
    worker killed shows at once (fewer serve); one respawned counts again as soon as it
    serves. After a quiet spell the rate last measured holds. ``None`` until tasks have
    run: a cold start refuses nothing on a guess.
    """

    WINDOW_S = 5.0
    EVERY_S = 0.2

    def __init__(self, stats: Callable[[], PoolStats | None]) -> None:
        self._stats = stats
        # (when, tasks run, batches, run time summed over tasks)
        self._samples: deque[tuple[float, int, int, float]] = deque()
        self._per_worker: float | None = None
        self._next_at = 0.0
        self._rate: float | None = None

    def rate(self, now: float | None = None) -> float | None:
        """Tasks per second the serving workers can finish, or None when not known yet."""
        now = time.monotonic() if now is None else now
        if now < self._next_at:
            return self._rate
        self._next_at = now + self.EVERY_S
        stats = self._stats()
        if stats is None:
            return None
        run = stats.run_time
        self._samples.append((now, run.count, stats.batches, run.sum))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        _, tasks0, batches0, sum0 = self._samples[0]
        tasks, batches, seconds = run.count - tasks0, stats.batches - batches0, run.sum - sum0
        if tasks > 0 and seconds > 0:
            per_batch = tasks / batches if batches > 0 else 1.0
            self._per_worker = tasks * per_batch / seconds
        serving = stats.serving_workers
        self._rate = None if self._per_worker is None or not serving else (
            self._per_worker * serving)
        return self._rate

    def retry_after(self, queued: float) -> int:
        """Seconds for ``queued`` tasks to drain at the measured rate, bounded."""
        rate = self.rate()
        if rate is None or rate <= 0:
            return RETRY_AFTER_S
        return bounded_retry(queued / rate)


def bounded_retry(seconds: float) -> int:
    """``seconds`` stretched by up to half at random, rounded up and bounded: the clients
    refused in one burst come back spread out, not as the same burst again."""
    seconds *= 1 + random.random() / 2
    return max(RETRY_AFTER_S, min(RETRY_AFTER_MAX_S, math.ceil(seconds)))


class LoadShedder:
    """Deadline-aware admission, and refusals before the body is read.

    ``admit`` refuses a request of ``items`` items whose estimated finish (the items ahead of
    it and its own, over the pool's measured rate, times the headroom) falls after
    its deadline: 503 with ``Retry-After`` at once, rather than a queued request that fails
    with 504 when its deadline has passed. It only refuses on a measured rate (``DrainRate``)
    and counts the items ahead itself (``hold``): exact and free, where the pool's snapshot
    walks its queue.

    ``refuse_now`` applies the same rule, and the full queue's, to a request whose body has
    not been read: a request that would be refused anyway costs no upload read, no multipart
    parse, no image check (under load those made a 503 take seconds). After a 503 for a full
    queue, it checks the queue for ``SHEDDING_S``; outside that it is arithmetic on two
    numbers.
    """

    def __init__(self, stats: Callable[[], PoolStats | None], count: Callable[[str], None],
                 headroom: float = ADMISSION_HEADROOM) -> None:
        self.headroom = headroom  # 0: the deadline rule is off
        self.drain = DrainRate(stats)
        self._stats = stats
        self._count = count
        self.in_flight = 0  # items submitted by the server and not finished
        self.shedding_until = 0.0

    def hold(self, items: int) -> _Held:
        """``with shedder.hold(n):`` around the submission and wait of a request's items."""
        return _Held(self, items - _reserved.get())

    def reserve(self) -> _Reserved:
        """``with shedder.reserve():`` around a request admitted before its body is read: it
        counts as one item ahead of those that arrive while it is read (a burst of requests
        would otherwise all pass the check before any of them was counted)."""
        return _Reserved(self)

    def estimate(self, items: int) -> float | None:
        """Seconds until ``items`` more would be done, at the measured rate; None: unknown."""
        rate = self.drain.rate()
        if rate is None or rate <= 0:
            return None
        return (self.in_flight + items) / rate

    def admit(self, items: int, remaining: float, budget: str, reason: str = DEADLINE
              ) -> ServingError | None:
        """The 503 for ``items`` that would not be done within ``remaining`` seconds (the
        request's deadline, ``budget`` as the client is told it), else None."""
        if not self.headroom:
            return None
        estimate = self.estimate(items - _reserved.get())
        if estimate is None or estimate * self.headroom <= remaining:
            return None
        self._count(reason)
        # When the work ahead will have drained far enough for such a request to fit.
        seconds = bounded_retry(estimate - remaining / self.headroom)
        return ServingError(
            503, f"the server cannot finish this request within its deadline of {budget}: "
                 f"about {estimate:.1f} s of work is ahead of it; retry in about {seconds} s",
            {"Retry-After": str(seconds)})

    def queue_full(self) -> ServingError:
        """The 503 of a request the full queue refused; opens the shedding window."""
        self._count(QUEUE_FULL)
        self.shedding_until = time.monotonic() + SHEDDING_S
        return self._at_capacity(self.drain.retry_after(self.in_flight))

    def refuse_now(self, queue_size: int, budget_s: float) -> ServingError | None:
        """The 503 for a new request that would be refused once read, else None: a one-item
        request that cannot finish in ``budget_s`` (the server's deadline; a client can only
        shorten it), or any while shedding and the queue is still full."""
        refused = self.admit(1, budget_s, f"{budget_s:g} s", SHED)
        if refused is not None or time.monotonic() >= self.shedding_until:
            return refused
        current = self._stats()
        if current is None or current.queue_depth < queue_size:
            return None
        self._count(SHED)
        return self._at_capacity(self.drain.retry_after(current.queue_depth))

    @staticmethod
    def _at_capacity(seconds: int) -> ServingError:
        return ServingError(503, "the server is at capacity (request queue full); retry in "
                                 f"about {seconds} s", {"Retry-After": str(seconds)})


class _Held:
    __slots__ = ("shedder", "items")

    def __init__(self, shedder: LoadShedder, items: int) -> None:
        self.shedder = shedder
        self.items = items

    def __enter__(self) -> None:
        self.shedder.in_flight += self.items

    def __exit__(self, *exc_info: object) -> None:
        self.shedder.in_flight -= self.items


class _Reserved:
    __slots__ = ("shedder", "token")

    def __init__(self, shedder: LoadShedder) -> None:
        self.shedder = shedder

    def __enter__(self) -> None:
        self.shedder.in_flight += 1
        self.token = _reserved.set(1)

    def __exit__(self, *exc_info: object) -> None:
        self.shedder.in_flight -= 1
        _reserved.reset(self.token)
