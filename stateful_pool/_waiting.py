"""How callers wait without a thread per task: for room in a bounded queue (``Capacity``)
and, from asyncio, for results (``LoopBridge``)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from ._task import Task, on_dispatcher_thread
from .errors import QueueFullError, TaskTimeoutError

_running_loop = asyncio._get_running_loop  # the running loop of this thread, or None


class _Waiter:
    """One caller waiting for room in the queue: a thread (``lock``) or a coroutine
    (``loop`` + ``future``). ``state`` changes only under the capacity's lock."""

    __slots__ = ("lock", "bridge", "future", "state")

    def __init__(self, bridge: LoopBridge | None = None) -> None:
        self.state = _WAITING
        self.bridge = bridge
        if bridge is None:
            self.lock: threading.Lock | None = threading.Lock()
            self.lock.acquire()
            self.future: asyncio.Future[None] | None = None
        else:
            self.lock = None
            self.future = asyncio.get_running_loop().create_future()

    def wake(self) -> None:
        """Tell the waiter it holds a place now (called with the capacity's lock released)."""
        if self.lock is not None:
            self.lock.release()
            return
        assert self.bridge is not None and self.future is not None
        try:
            self.bridge.call(_resolve_waiter, self.future)
        except RuntimeError:  # that loop is closed: nobody will take the place; pass it on
            self.state = _ABANDONED
            raise


_WAITING, _GRANTED, _ABANDONED = 0, 1, 2
# A thread's wait takes at most this many seconds (longer ones raise OverflowError).
_LONGEST_WAIT = threading.TIMEOUT_MAX


def _room_wait(submission_timeout: float | None, deadline: float | None) -> float | None:
    """How long a submit may wait for room: ``submission_timeout``, and never past the
    task's own deadline."""
    if deadline is None:
        return submission_timeout
    left = max(0.0, deadline - time.monotonic())
    return left if submission_timeout is None else min(left, submission_timeout)


class Capacity:
    """Bounds the number of queued tasks (``queue_size``).

    Callers that find the queue full wait in one FIFO line, threads and coroutines alike. A
    freed place is handed to the first caller still waiting (never to a newcomer, never to
    one that gave up), and only that caller is woken: O(1) per task, however many wait.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def _try_take(self) -> bool:
        if not self._waiters and self.used < self.limit:  # type: ignore[operator]
            self.used += 1
            return True
        return False

    def admit(self, submission_timeout: float | None, deadline: float | None) -> None:
        """Take a place for one task from a thread, waiting ``submission_timeout`` at most
        and never past the task's ``deadline``; raise if no place came."""
        if on_dispatcher_thread():  # a done-callback: room is made on this very thread
            if not self.acquire(0):
                raise QueueFullError(
                    f"the pool's queue is full ({self.limit} tasks waiting), and this submit "
                    "runs in a done-callback, on the pool's dispatcher thread, which cannot "
                    "wait for room: it is the thread that makes room")
        elif not self.acquire(_room_wait(submission_timeout, deadline)):
            raise self._no_room(submission_timeout, deadline)

    async def admit_async(self, submission_timeout: float | None, deadline: float | None,
                          bridge: LoopBridge) -> None:
        """``admit`` for a coroutine: the event loop goes on while it waits."""
        if not await self.acquire_async(_room_wait(submission_timeout, deadline), bridge):
            raise self._no_room(submission_timeout, deadline)

    def _no_room(self, submission_timeout: float | None, deadline: float | None) -> Exception:
        if deadline is not None and time.monotonic() >= deadline:
            return TaskTimeoutError("task timed out waiting for room in the queue; it will "
                                    "not run")
        return QueueFullError(
            f"the pool's queue is full ({self.limit} tasks waiting) and no room came "
            f"within submission_timeout={submission_timeout} s")

    def acquire(self, timeout: float | None) -> bool:
        with self._lock:
            if self._try_take():
                return True
            if timeout is not None and timeout <= 0:
                return False
            waiter = _Waiter()
            self._waiters.append(waiter)
        assert waiter.lock is not None
        if waiter.lock.acquire(timeout=-1 if timeout is None else min(timeout, _LONGEST_WAIT)):
            return True
        return self._give_up(waiter)

    async def acquire_async(self, timeout: float | None, bridge: LoopBridge) -> bool:
        with self._lock:
            if self._try_take():
                return True
            if timeout is not None and timeout <= 0:
                return False
            waiter = _Waiter(bridge)
            self._waiters.append(waiter)
        assert waiter.future is not None
        try:
            await asyncio.wait_for(waiter.future, timeout)
            return True
        except TimeoutError:
            return self._give_up(waiter)
        except asyncio.CancelledError:
            if self._give_up(waiter):
                self._release_one()  # granted as we were cancelled: pass the place on
            raise

    def _give_up(self, waiter: _Waiter) -> bool:
        """A waiter stops waiting; True if a place was granted to it meanwhile (it keeps it)."""
        with self._lock:
            if waiter.state == _GRANTED:
                return True
            waiter.state = _ABANDONED
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            return False

    def release(self, task: Task) -> None:
        with self._lock:
            if not task.holds_slot:
                return
            task.holds_slot = False
        self._release_one()

    def _release_one(self) -> None:
        """Free one place: hand it to the first live waiter, or return it to the pool."""
        while True:
            with self._lock:
                if not self._waiters:
                    self.used -= 1
                    return
                waiter = self._waiters.popleft()
                waiter.state = _GRANTED  # the place moves to it; `used` is unchanged
            try:
                waiter.wake()
                return
            except RuntimeError:
                continue  # its event loop is closed; next in line


class LoopBridge:
    """Runs callbacks from other threads on one event loop, many per wakeup.

    ``call_soon_threadsafe`` costs a write to the loop's self-pipe and a wakeup per call;
    under load this bridge coalesces everything that arrived before the loop got round to it
    into one callback: finished tasks (``watch``) and places granted in a full queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # A weak reference: the pool's loop -> bridge map must not keep closed loops alive.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._ready: list[tuple[Any, Any]] = []
        self._scheduled = False
        # Whether this loop may read lent pipes itself (``add_reader``; not every loop can).
        self.reads_pipes = True

    def watch(self, task: Task) -> asyncio.Future[Any]:
        """A future of this loop that follows ``task``."""
        waiter = asyncio.get_running_loop().create_future()
        task.add_done_callback(lambda t: self._deliver_later(t, waiter))
        return waiter

    def _deliver_later(self, task: Any, waiter: asyncio.Future[Any]) -> None:
        if _running_loop() is self._loop():  # settled on the loop's own thread (a lent pipe)
            _copy_outcome((task, waiter))
            return
        try:
            self.call(_copy_outcome, (task, waiter))
        except RuntimeError:
            pass  # the loop is closed: nobody awaits this any more

    def read_lent(self, lent: Any, reclaim: Any) -> LentReader | None:
        """Have the loop read the lent pipe ``lent`` when it is readable: ``reclaim(lent,
        True)`` reads the answer and settles the task, here. None if this loop cannot watch
        fds."""
        loop = self._loop()
        if loop is None:
            return None
        reader = LentReader(loop, lent, reclaim)
        try:
            loop.add_reader(reader.fd, reader.on_ready)
        except NotImplementedError:  # a loop without add_reader (Windows' proactor)
            self.reads_pipes = False
            os.close(reader.fd)
            return None
        return reader

    def call(self, fn: Any, arg: Any) -> None:
        """Run ``fn(arg)`` on the loop soon; ``RuntimeError`` if the loop is closed."""
        with self._lock:
            self._ready.append((fn, arg))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._ready.clear()
                self._scheduled = False
            raise

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for fn, arg in ready:
            fn(arg)


class LentReader:
    """An event loop's watch on a lent pipe, for one task.

    The loop watches a duplicate of the pipe's fd, closed here: the loop never holds a number
    that the dispatcher may close (the worker died) and the system give to another file."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lent: Any, reclaim: Any) -> None:
        self._loop = loop
        self._lent = lent
        self._reclaim = reclaim
        self.fd = os.dup(lent.fd)
        self._open = True

    def on_ready(self) -> None:
        self.stop()  # once: if the dispatcher has to read it, the loop must not spin
        self._reclaim(self._lent, True, True)

    def stop(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.fd)
            os.close(self.fd)


def _copy_outcome(pair: tuple[Task, asyncio.Future[Any]]) -> None:
    task, waiter = pair
    if waiter.done():
        return
    if task.cancelled():
        waiter.cancel()
        return
    exc = task.exception()
    if exc is None:
        waiter.set_result(task.result())
    else:
        waiter.set_exception(exc)


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
