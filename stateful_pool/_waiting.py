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

    def try_take(self) -> bool:
        """Take a place if one is free and nobody waits for one; never waits."""
        with self._lock:
            return self._try_take()

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
        # Its watches on workers' pipes, kept from one lent task to the next (loop thread).
        self._pipes: dict[Any, PipeReader] = {}
        self._fds: set[int] = set()
        weakref.finalize(self, _close_pipes, self._loop, self._fds).atexit = False

    def loop(self) -> asyncio.AbstractEventLoop:
        """Its loop (called on that loop, which is running)."""
        loop = self._loop()
        assert loop is not None
        return loop

    def watch(self, task: Task) -> asyncio.Future[Any]:
        """A future of this loop that follows ``task``."""
        waiter = asyncio.get_running_loop().create_future()
        task.add_done_callback(lambda t: self._deliver_later(t, waiter))
        return waiter

    def _deliver_later(self, task: Any, waiter: asyncio.Future[Any]) -> None:
        loop = _running_loop()
        if loop is not None and loop is self._loop():  # settled on the loop's own thread
            _copy_outcome((task, waiter))
            return
        try:
            self.call(_copy_outcome, (task, waiter))
        except RuntimeError:
            pass  # the loop is closed: nobody awaits this any more

    def read_lent(self, lent: Any, reclaim: Any) -> PipeReader | None:
        """Have the loop read the lent pipe ``lent`` when its answer comes: ``reclaim(lent,
        True, True)`` reads it and settles the task, here. None if this loop cannot watch
        fds. ``end_lent`` afterwards, whatever happened."""
        reader = self._pipes.get(lent.slot)
        if reader is not None and reader.conn is not lent.conn:
            reader.close()  # a former process of that worker
            reader = None
        if reader is None:
            loop = self._loop()
            if loop is None:
                return None
            try:
                reader = PipeReader(self, loop, lent, reclaim)
            except NotImplementedError:  # a loop without add_reader (Windows' proactor)
                self.reads_pipes = False
                return None
        reader.lent = lent
        return reader

    @staticmethod
    def end_lent(reader: PipeReader, lent: Any) -> None:
        """The task ``lent`` was for is over for its caller. If its answer did not come
        through this loop (a timeout, a cancel, a crash), stop watching that pipe: the
        dispatcher reads it now, and a level-triggered watch would spin."""
        if reader.lent is lent:
            reader.lent = None
            reader.close()

    def call(self, fn: Any, arg: Any) -> None:
        """Run ``fn(arg)`` on the loop soon; ``RuntimeError`` if the loop is closed."""
        loop = _running_loop()
        if loop is not None and loop is self._loop():  # on the loop itself: no wakeup needed
            loop.call_soon(fn, arg)
            return
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


class PipeReader:
    """An event loop's watch on one worker's pipe, kept while the tasks it lends to this
    loop keep coming back through it: registering a reader costs more than the rest of the
    loop's side of a task.

    The loop watches a duplicate of the pipe's fd, closed here: the loop never holds a number
    that the dispatcher may close (the worker died) and the system give to another file. The
    watch ends at the first readiness that is not this loop's lent answer (the worker now
    answers someone else, or died)."""

    def __init__(self, bridge: LoopBridge, loop: asyncio.AbstractEventLoop, lent: Any,
                 reclaim: Any) -> None:
        # No reference to the loop: the pool's loop -> bridge map holds this (through the
        # bridge) and must not keep the loop alive.
        self._bridge = bridge
        self._reclaim = reclaim
        self.slot = lent.slot
        self.conn = lent.conn
        self.lent: Any = None
        self.fd = os.dup(lent.fd)
        try:
            loop.add_reader(self.fd, self._ready)
        except BaseException:
            os.close(self.fd)
            raise
        bridge._pipes[self.slot] = self
        bridge._fds.add(self.fd)
        self._open = True

    def _ready(self) -> None:
        lent, self.lent = self.lent, None
        # Not ``readable``: a readiness the selector reported for another party's answer
        # (read meanwhile, and the worker lent to this loop again) must not block the loop
        # in a read; ``reclaim`` looks at the pipe once more.
        if lent is None or not self._reclaim(lent, True, False):
            self.close()  # not an answer this loop reads: the dispatcher's to read

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        bridge = self._bridge
        if bridge._pipes.get(self.slot) is self:
            del bridge._pipes[self.slot]
        bridge._fds.discard(self.fd)
        loop = bridge._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)
        os.close(self.fd)


def _close_pipes(loop_ref: Any, fds: set[int]) -> None:
    """A dropped bridge's watches: removed on its loop if that still runs, else closed."""
    if not fds:
        return
    fds = set(fds)
    loop = loop_ref()
    if loop is not None and not loop.is_closed():
        try:
            loop.call_soon_threadsafe(_remove_and_close, loop, fds)
            return
        except RuntimeError:
            pass  # closed meanwhile
        _close_fds(fds)
    else:
        _close_fds(fds)


def _remove_and_close(loop: asyncio.AbstractEventLoop, fds: set[int]) -> None:
    for fd in fds:
        try:
            loop.remove_reader(fd)
        except Exception:
            pass
    _close_fds(fds)


def _close_fds(fds: set[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
