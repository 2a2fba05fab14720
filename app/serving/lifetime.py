"""A request's lifetime: its deadline, and what happens when its client leaves.

Every inference request carries a deadline: ``REQUEST_TIMEOUT_S`` after the request
arrived, or sooner when the client asks for less (``X-Request-Timeout: SECONDS`` over HTTP;
a protocol may have its own way, as KServe v2's ``timeout`` parameter). A client can shorten
the server's limit, never extend it. Each pool task of the request gets the time left
(``pool.with_timeout``), so a task whose deadline passes while it is queued leaves the queue
and never reaches a worker, nor a batch; the client gets 504.

When the client disconnects before its answer, the request's pool calls are cancelled: its
tasks still queued leave the queue, a running one is abandoned (shutdown will not wait for
it). The request is logged and counted (``http_requests_abandoned_total``) and recorded as
status 499.

How a departure is noticed is the protocol's business: it hands the lifetime a
``client_gone`` coroutine function that returns when the client has gone. Over HTTP that is
the ASGI ``http.disconnect`` message, awaited without polling (``app.protocols.http``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from stateful_pool import CallOptions, SPool, TaskTimeoutError

T = TypeVar("T")

SERVER_LIMIT = "REQUEST_TIMEOUT_S"


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


@dataclass(frozen=True)
class Lifetime:
    """When a request must be answered by, and how to know its client has gone.

    Attributes:
        received_at: ``time.monotonic()`` when the request arrived; the deadline counts from
            there, so reading a slow upload spends the request's budget too.
        budget_s: seconds from arrival to the deadline.
        source: which limit set the budget (``REQUEST_TIMEOUT_S``, ``X-Request-Timeout``...).
        client_gone: returns when the client has gone; None when the protocol cannot tell.
    """

    received_at: float
    budget_s: float
    source: str
    client_gone: Callable[[], Awaitable[Any]] | None = None

    @classmethod
    def of(cls, limit_s: float, received_at: float | None = None,
           client_limits: Mapping[str, float | None] | None = None,
           client_gone: Callable[[], Awaitable[Any]] | None = None) -> Lifetime:
        """The server's ``limit_s``, or the shortest finite limit a client asked for."""
        budget, source = limit_s, SERVER_LIMIT
        for name, seconds in (client_limits or {}).items():
            if seconds is not None and math.isfinite(seconds) and seconds < budget:
                budget, source = seconds, name
        return cls(time.monotonic() if received_at is None else received_at, budget, source,
                   client_gone)

    @property
    def deadline(self) -> float:
        return self.received_at + self.budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def at_most(self, limit_s: float) -> Lifetime:
        """This lifetime, or one cut to ``limit_s`` from arrival (a model's own
        ``REQUEST_TIMEOUT_S``, shorter than the server's)."""
        if limit_s >= self.budget_s:
            return self
        return replace(self, budget_s=limit_s, source=SERVER_LIMIT)

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

    async def while_connected(self, work: Awaitable[T]) -> T:
        """Await ``work`` (the request's pool calls) while the client is connected.

        Raises:
            ClientDisconnected: the client left first; ``work`` was cancelled, so its queued
                pool tasks left the queue.
        """
        if self.client_gone is None:
            return await work
        current = asyncio.current_task()
        assert current is not None
        gone = False

        def client_left(watcher: asyncio.Future[Any]) -> None:
            nonlocal gone
            if not watcher.cancelled() and watcher.exception() is None:
                gone = True
                current.cancel()

        # The watcher wakes this task by cancelling it, so ``work`` runs here, without a task
        # of its own: one extra task per request, not two.
        watcher = asyncio.ensure_future(self.client_gone())
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
        raise ClientDisconnected
