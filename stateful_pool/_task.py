"""One submitted task, which is also the future handed to its caller."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
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
        self._fields(task_id, payload, deadline, holds_slot, on_cancel, context)

    def _fields(self, task_id: int, payload: m.Payload, deadline: float | None,
                holds_slot: bool, on_cancel: Callable[[Task], None],
                context: dict[str, Any] | None) -> None:
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


_PENDING, _RUNNING, _FINISHED, _CANCELLED = 0, 1, 2, 3
_running_loop = asyncio._get_running_loop


class DirectTask(Task):
    """A task whose caller waits for it inside the library (``execute``, ``async_execute``)
    and never sees it. It keeps ``Task``'s interface for the pool without a
    ``concurrent.futures`` condition or done-callbacks: a lock of its own makes settling and
    cancelling exclusive, and ``_deliver`` tells the one waiter, once."""

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 on_cancel: Callable[[Task], None], context: dict[str, Any] | None) -> None:
        # Not Future.__init__: nothing but the caller's own waiter waits for this object.
        self._lock = threading.Lock()
        self._status = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._fields(task_id, payload, deadline, False, on_cancel, context)

    def _deliver(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        return self._status >= _FINISHED

    def cancelled(self) -> bool:
        return self._status == _CANCELLED

    def running(self) -> bool:
        return self._status == _RUNNING

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._status == _CANCELLED:
                return False
            if self._status != _PENDING:
                raise RuntimeError(f"task {self.id} in an unexpected state")
            self._status = _RUNNING
            return True

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._status >= _FINISHED:
                raise InvalidStateError(f"task {self.id} is done already")
            self._value = value
            self._error = error
            self._status = _FINISHED  # last: a reader that sees it done finds the outcome
        self._deliver()

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)

    def cancel(self) -> bool:
        with self._lock:
            if self._status == _CANCELLED:
                return True
            if self._status != _PENDING:
                return False
            self._status = _CANCELLED
        on_cancel, self.on_cancel = self.on_cancel, _done
        on_cancel(self)
        self._deliver()
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The outcome of a done task (its waiter was told)."""
        if self._status == _CANCELLED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._status == _CANCELLED:
            raise CancelledError()
        return self._error

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        raise TypeError(f"a {type(self).__name__} tells its one waiter; it takes no "
                        "done-callbacks")


class ThreadTask(DirectTask):
    """A thread's ``execute``: the thread blocks on a lock of the task's own, released when
    the task is settled (by that thread itself when it read the answer from a lent pipe, or
    by whichever thread delivers results)."""

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 on_cancel: Callable[[Task], None], context: dict[str, Any] | None) -> None:
        # DirectTask's fields, set here without super(): this runs on every execute().
        self._lock = threading.Lock()
        self._settled = settled = threading.Lock()
        settled.acquire()
        self._status = _PENDING
        self._value = None
        self._error = None
        self._fields(task_id, payload, deadline, False, on_cancel, context)

    def _deliver(self) -> None:
        self._settled.release()

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the task is done (``timeout`` is not used), then its outcome."""
        if self._status < _FINISHED:
            if _thread.__dict__:
                raise refuse_to_wait("pool.execute()")
            self._settled.acquire()
        return DirectTask.result(self)


class LoopTask(DirectTask):
    """``async_execute``'s task: it resolves the awaiting coroutine's own asyncio future
    (``waiter``), on the loop when the loop settles it (a loop that drives the pool), else
    through the loop's bridge."""

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 on_cancel: Callable[[Task], None], context: dict[str, Any] | None,
                 waiter: asyncio.Future[Any], bridge: Any) -> None:
        super().__init__(task_id, payload, deadline, on_cancel, context)
        self.waiter = waiter
        self.bridge = bridge

    def _deliver(self) -> None:
        waiter = self.waiter
        if _running_loop() is waiter.get_loop():  # settled on the loop: no hop
            settle_waiter(self)
            return
        try:
            self.bridge.call(settle_waiter, self)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits this any more


def settle_waiter(task: LoopTask) -> None:
    """Copy a done ``LoopTask``'s outcome to its waiter (on the waiter's loop)."""
    waiter = task.waiter
    if waiter.done():
        return  # its coroutine was cancelled
    if task._status == _CANCELLED:
        waiter.cancel()
    elif task._error is not None:
        waiter.set_exception(task._error)
    else:
        waiter.set_result(task._value)
