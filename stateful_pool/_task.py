"""One submitted task, which is also the future handed to its caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from . import _messages as m
from ._states import TaskState

# Marks the pools' dispatcher threads: its __dict__ is empty on every other thread.
_thread = threading.local()


def mark_dispatcher_thread() -> None:
    """Called once by each pool's dispatcher thread."""
    _thread.dispatcher = True


def enter_delivery() -> None:
    """An event loop that drives a pool starts delivering results on its thread: like the
    dispatcher thread, it runs done-callbacks, which must not wait for the pool meanwhile."""
    _thread.delivering = True


def leave_delivery() -> None:
    del _thread.delivering


def on_dispatcher_thread() -> bool:
    """Whether this code runs where a pool delivers results (its dispatcher thread, or an event
    loop reading the workers' pipes): in a future's done-callback."""
    return bool(_thread.__dict__)


def refuse_to_wait(what: str) -> RuntimeError:
    return RuntimeError(
        f"{what} cannot wait here: this code runs in a done-callback, on a pool's dispatcher "
        "thread, the thread that hands out tasks and delivers results; waiting there for the "
        "pool would freeze it. Chain with another add_done_callback, or wait in a thread of "
        "your own.")


_future_result = Future.result
_future_exception = Future.exception


class PoolFuture(Future[Any]):
    """A future the pool resolves on its dispatcher thread, where done-callbacks run: waiting
    for one there raises instead of freezing the pool."""

    # Runs on every execute(): the checks are inlined (measured: 0.07 us over Future.result).
    def result(self, timeout: float | None = None) -> Any:
        if _thread.__dict__ and not self.done():
            raise refuse_to_wait("future.result()")
        return _future_result(self, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if _thread.__dict__ and not self.done():
            raise refuse_to_wait("future.exception()")
        return _future_exception(self, timeout)


class Task(PoolFuture):
    """One submitted task; it is also the future handed to the caller (one object per task).

    ``cancel()`` tells the pool at once, so a cancelled task leaves the queue and frees its
    place in ``queue_size`` without a done-callback on every task.
    """

    is_stream = False  # a _stream.Stream: its result comes as chunks

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 holds_slot: bool, on_cancel: Callable[[Task], None],
                 context: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.id = task_id
        self.payload = payload
        self.deadline = deadline
        self.context = context  # travels to the worker with the task (current_contexts())
        self.submitted_at = time.monotonic()
        self.started_at = 0.0
        self.state = TaskState.QUEUED
        self.holds_slot = holds_slot
        self.abandoned = False  # its caller stopped waiting while it ran (asyncio cancel)
        # Reaches the pool; dropped once the task is done (forget_pool), so that a finished
        # task, kept in the deadline heap until its deadline or by its caller, does not keep
        # a pool its owner dropped (and its workers) alive.
        self.on_cancel = on_cancel

    @property
    def wanted(self) -> bool:
        """Whether a caller still waits for this task (not timed out, cancelled, abandoned)."""
        return not (self.abandoned or self.done())

    @property
    def paused(self) -> bool:
        """Whether its worker waits for this task's reader (only a stream can)."""
        return False

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            on_cancel, self.on_cancel = self.on_cancel, _done
            on_cancel(self)
        return cancelled

    def forget_pool(self) -> None:
        """The task is done: it needs its pool no more."""
        self.on_cancel = _done


def _done(task: Task) -> None:
    """A finished task's ``on_cancel``: nothing is left to tell the pool."""


def settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve a future unless it is already done (a timeout or a cancel got there first)."""
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except InvalidStateError:
        return False
    return True
