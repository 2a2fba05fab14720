"""A request's lifetime: its deadline, and what happens when its client leaves.

Every inference request carries a deadline: ``REQUEST_TIMEOUT_S`` after the request
arrived, or sooner when the client sends ``X-Request-Timeout: SECONDS`` (it can shorten the
server's limit, never extend it). Each pool task of the request gets the time left
(``pool.with_timeout``), so a task whose deadline passes while it is queued leaves the
queue and never reaches a worker, nor a batch; the client gets 504.

When the client disconnects before its answer, the request's pool calls are cancelled: its
tasks still queued leave the queue, a running one is abandoned (shutdown will not wait for
it). The request is logged and counted (``http_requests_abandoned_total``) and recorded as
status 499 (nginx's "client closed request"; nobody receives it).

The disconnect is noticed without polling: once the body is read, the next ASGI
``receive()`` only returns when the connection closes (``http.disconnect``). One watcher
task per request awaits it, and cancels the request's own task when it fires. Starlette's
``request.is_disconnected()`` polled per request would cost a cancel scope and a timed
receive on every poll.

``run_for_client`` and ``Lifetime`` are shared by every inference route (``/predict`` and
any other protocol front door over the same pool).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Header, Request
from starlette.types import Receive

from stateful_pool import CallOptions, SPool, TaskTimeoutError

logger = logging.getLogger("app.lifetime")

T = TypeVar("T")

DEADLINE_HEADER = "X-Request-Timeout"
# Where RequestContextMiddleware notes when the request arrived (time.monotonic()): the
# deadline counts from there, so reading a slow upload spends the request's budget too.
RECEIVED_AT = "app.received_at"
# Status recorded (access log, metrics) for a request whose client left before its answer.
CLIENT_CLOSED = 499

DeadlineHeader = Annotated[float | None, Header(
    alias=DEADLINE_HEADER, ge=0.001, allow_inf_nan=False,
    description="Seconds the client will wait for the answer (decimal, at least 0.001). "
                "Shortens "
                "the server's REQUEST_TIMEOUT_S, never extends it; past it the request's "
                "queued work is dropped and the answer is 504.")]


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass(frozen=True)
class Lifetime:
    """When a request must be answered by; ``source`` says which limit set it."""

    received_at: float  # time.monotonic()
    budget_s: float
    source: str

    @property
    def deadline(self) -> float:
        return self.received_at + self.budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def pool_calls(self, pool: SPool[Any, Any]) -> CallOptions[Any]:
        """The pool's execute methods with the time left as their timeout.

        Raises:
            TaskTimeoutError: the deadline has passed already (nothing is submitted).
        """
        left = self.remaining()
        if left <= 0:
            raise TaskTimeoutError("the request's deadline passed before its tasks were "
                                   "submitted; they will not run")
        return pool.with_timeout(left)

    def describe(self) -> str:
        return f"{self.budget_s:g} s ({self.source})"


def request_lifetime(request: Request, header_s: float | None) -> Lifetime:
    """The request's deadline: ``REQUEST_TIMEOUT_S``, or the client's shorter header value.

    Stored on ``request.state.lifetime`` for the 504 handler.
    """
    limit = float(request.app.state.settings.request_timeout_s)
    received_at = request.scope.get(RECEIVED_AT)
    if received_at is None:  # mounted without RequestContextMiddleware
        received_at = time.monotonic()
    if header_s is not None and math.isfinite(header_s) and header_s < limit:
        lifetime = Lifetime(received_at, header_s, DEADLINE_HEADER)
    else:
        lifetime = Lifetime(received_at, limit, "REQUEST_TIMEOUT_S")
    request.state.lifetime = lifetime
    return lifetime


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone. Call only once the request body has been read: the
    next message is then ``http.disconnect``, sent when the connection closes."""
    while (await receive())["type"] != "http.disconnect":
        pass  # a body chunk nobody asked for (the route read its body already)


async def run_for_client(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (the request's pool calls) while the client is connected.

    Raises:
        ClientDisconnected: the client left first; ``work`` was cancelled, so its queued
            pool tasks left the queue, and the request is counted as abandoned.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    def client_left(watcher: asyncio.Task[None]) -> None:
        nonlocal gone
        if not watcher.cancelled() and watcher.exception() is None:
            gone = True
            current.cancel()

    # The watcher wakes this task by cancelling it, so ``work`` runs here, without a task of
    # its own: one extra task per request, not two.
    watcher = asyncio.ensure_future(_disconnect(request.receive))
    watcher.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        current.uncancel()
    finally:
        watcher.remove_done_callback(client_left)
        watcher.cancel()
    waited = time.monotonic() - request.scope.get(RECEIVED_AT, time.monotonic())
    request.app.state.metrics.abandoned.inc()
    logger.info("client disconnected after %.0f ms; the request's queued tasks were "
                "withdrawn", waited * 1000)
    raise ClientDisconnected

