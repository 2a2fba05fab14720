"""An event loop that drives the pool: it queues and dispatches its own tasks and reads the
workers' answers itself, with no dispatcher thread in between.

A server's shape is one event loop awaiting ``async_execute`` for many requests at once.
Through the dispatcher thread, each burst costs two wakeups across threads (the loop's submit
wakes the dispatcher, the dispatcher's result wakes the loop), and the GIL changes hands each
time. So the first event loop that awaits a task *drives* the pool:

* under ``_sched``, the lock the dispatcher thread holds whenever it is awake, the loop puts
  its task on the queue and hands out whatever the workers can take, itself;
* it watches the workers' pipes (the poller's inner epoll, handed over in one call) and reads
  their answers on the loop, where the coroutines that await them are woken without a thread
  switch. The next queued task goes out before that, as on the dispatcher thread.

The dispatcher thread keeps everything else: the processes' sentinels (crashes), the timers
(deadlines, hang and spawn timeouts, restarts), tasks from other threads and loops (their
answers come back through the driving loop all the same), and shutdown. While a loop drives,
the dispatcher wakes at least every ``_WATCH`` seconds, and takes the pipes back when a
readable pipe has stayed unread for ``_STALL`` seconds: a loop that blocks, or that was closed,
never holds a worker's answer for long. No loop drives for ``_REST`` seconds after that. Only
one loop drives at a time; others go through the dispatcher thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._task import Task, enter_delivery, leave_delivery

if TYPE_CHECKING:
    from ._batching import PendingQueue
    from ._inbox import Message
    from ._poll import Poller
    from ._slot import WorkerSlot
    from ._stats import Counters
    from ._waiting import LoopBridge

logger = logging.getLogger("stateful_pool")

# The longest sleep of the dispatcher thread while a loop drives (s).
_WATCH = 0.05
# A readable pipe left unread this long by the driving loop is taken back (s).
_STALL = 0.1
# After that, no loop drives for this long (s).
_REST = 1.0
# How long the loop waits for the scheduling lock (the dispatcher thread holds it briefly,
# except while it starts or stops a process) before it lets the loop go on (s).
_SCHED_WAIT = 0.05

# What ``submit_from_loop`` did with a task.
FALLBACK = 0  # nothing: submit it the usual way
PLACED = 1  # sent to a worker, or queued
NEEDS_ROOM = 2  # nothing: it must take a place in ``queue_size`` first


class Drive:
    """One event loop's watch on the pool's pipes. Its methods run on that loop's thread,
    except ``alive`` and ``stop_soon``."""

    def __init__(self, dispatcher: LoopDriving, bridge: LoopBridge,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.bridge = bridge
        self._loop = weakref.ref(loop)
        # A duplicate of the inner epoll's fd, closed here: the loop never holds a number the
        # dispatcher may close and the system give to another file.
        self.fd = os.dup(dispatcher.poller.pipes_fd)
        self.open = True
        try:
            loop.add_reader(self.fd, dispatcher._drive_ready, self)
        except BaseException:
            self.open = False
            os.close(self.fd)
            raise

    def alive(self) -> bool:
        loop = self._loop()
        return loop is not None and not loop.is_closed()

    def stop(self) -> None:
        """Stop watching (the loop's thread, or any once the loop is closed)."""
        if not self.open:
            return
        self.open = False
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)
        os.close(self.fd)

    def stop_soon(self) -> None:
        """``stop`` from any thread: on the loop, or here once the loop is closed."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            self.stop()
            return
        if asyncio._get_running_loop() is loop:
            self.stop()
            return
        try:
            loop.call_soon_threadsafe(self.stop)
        except RuntimeError:  # closed meanwhile: its selector is closed too
            self.stop()


class LoopDriving:
    """The Dispatcher's side of a driving event loop (see the module's docstring)."""

    # Provided by the Dispatcher.
    _sched: threading.Lock
    poller: Poller[tuple[WorkerSlot, bool]]
    inbox: deque[Message]
    pending: PendingQueue[Task]
    idle: deque[WorkerSlot]
    counts: Counters
    closing: bool
    accepting: bool

    def _init_driving(self, can_drive: bool) -> None:
        self.driver: Drive | None = None
        self._can_drive = can_drive
        # When the dispatcher thread wakes next, at the latest (set before it sleeps).
        self._wake_at = math.inf
        self._drive_ticks = 0  # rounds of reading the driving loop has done
        self._stall_ticks = -1
        self._stall_since = 0.0
        self._drive_after = 0.0

    # Provided by the Dispatcher.
    wake: Callable[[], None]

    def _accept(self, task: Task) -> None: ...
    def _dispatch(self, now: float) -> None: ...
    def _on_readable(self, slot: WorkerSlot) -> None: ...

    # ---- the driving loop's side --------------------------------------------------------

    def submit_from_loop(self, task: Task, bridge: LoopBridge,
                         take_room: Callable[[], bool] | None) -> int:
        """From a coroutine: queue ``task`` and dispatch, on this loop, which drives the pool
        from now on if no other loop does. ``take_room``: takes a place in ``queue_size``
        without waiting, if there is one (None: no limit, or the task holds one already); a
        task that finds no idle worker needs it, and NEEDS_ROOM says it must wait for a
        place. FALLBACK: nothing done."""
        drive = self.driver
        if drive is None or drive.bridge is not bridge:
            if not self._can_drive or not bridge.reads_pipes:
                return FALLBACK
            if drive is not None and drive.alive():
                return FALLBACK  # another loop drives
            if drive is None and time.monotonic() < self._drive_after:
                return FALLBACK
        if self.inbox or not self._sched.acquire(timeout=_SCHED_WAIT):
            return FALLBACK  # what others sent first goes first
        try:
            if self.closing or not self.accepting or self.inbox:
                return FALLBACK
            if (self.driver is None or self.driver.bridge is not bridge) \
                    and not self._start_driving(bridge):
                return FALLBACK
            if take_room is not None and (self.pending or not self.idle):
                if not take_room():
                    return NEEDS_ROOM
                task.holds_slot = True
            now = time.monotonic()
            self._drive_ticks += 1  # a loop busy submitting is not a stalled one
            self._accept(task)
            self._dispatch(now)
            deadline = task.deadline
            if deadline is not None and deadline < self._wake_at:
                self.wake()
            elif self.pending and self.idle:  # a batch that waits for more tasks
                due = self.pending.due_at()
                if due is not None and due < self._wake_at:
                    self.wake()
            return PLACED
        finally:
            self._sched.release()

    def leave_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """That loop is about to block its thread (a synchronous ``execute`` in a coroutine):
        the dispatcher thread reads the pipes again, for ``_REST`` seconds at least."""
        drive = self.driver
        if drive is None or drive._loop() is not loop:
            return
        with self._sched:
            if self.driver is drive:
                self._undrive()
                self._drive_after = time.monotonic() + _REST

    def _start_driving(self, bridge: LoopBridge) -> bool:
        """This loop drives from now on (under ``_sched``); False if it cannot."""
        self._undrive()
        try:
            drive = Drive(self, bridge, asyncio.get_running_loop())
        except NotImplementedError:  # a loop without add_reader (Windows' proactor)
            bridge.reads_pipes = False
            return False
        self.poller.hand_pipes(True)
        self.driver = drive
        self._stall_ticks = -1
        self.wake()  # its sleep is capped while a loop drives
        return True

    def _drive_ready(self, drive: Drive) -> None:
        """The driving loop's callback: a worker's pipe is readable."""
        if self.driver is not drive:
            drive.stop()
            return
        if not self._sched.acquire(timeout=_SCHED_WAIT):
            return  # the dispatcher is busy; the loop goes on and comes back
        enter_delivery()  # done-callbacks run here now: they must not wait for the pool
        try:
            if self.driver is not drive:
                drive.stop()
                return
            poller = self.poller
            for fd in poller.ready_pipes():
                owner = poller.owner(fd)
                if owner is not None and owner[0].lent is None:
                    self._on_readable(owner[0])
            self._drive_ticks += 1
            if self.pending and self.idle:
                due = self.pending.due_at()
                if due is not None and due < self._wake_at:
                    self.wake()
        except Exception:
            logger.exception("stateful_pool: reading the workers' pipes on the event loop "
                             "failed; the dispatcher thread reads them from now on")
            self._undrive()
            self._drive_after = math.inf
        except BaseException:  # Ctrl-C on the loop: the dispatcher thread reads from now on
            self._undrive()
            raise
        finally:
            leave_delivery()
            self._sched.release()

    # ---- the dispatcher thread's side ---------------------------------------------------

    def _watch_driver(self, now: float) -> None:
        """Take the pipes back from a loop that closed, or that leaves them unread."""
        drive = self.driver
        if drive is None:
            return
        if self.closing or not drive.alive():
            self._undrive()
            return
        if not self.poller.ready_pipes():
            self._stall_ticks = -1
        elif self._stall_ticks != self._drive_ticks:
            self._stall_ticks, self._stall_since = self._drive_ticks, now
        elif now - self._stall_since >= _STALL:
            logger.debug("stateful_pool: the driving event loop left a worker's answer unread "
                         "for %.2f s; the dispatcher thread reads the pipes", _STALL)
            self._undrive()
            self._drive_after = now + _REST

    def _sleep_cap(self, timeout: float | None) -> float | None:
        """The dispatcher's next sleep, capped while a loop drives; notes when it ends."""
        if self.driver is not None:
            timeout = _WATCH if timeout is None else min(timeout, _WATCH)
        self._wake_at = math.inf if timeout is None else time.monotonic() + timeout
        return timeout

    def _undrive(self) -> None:
        """The pipes are the dispatcher thread's again (under ``_sched``, any thread)."""
        drive = self.driver
        if drive is None:
            return
        self.driver = None
        self.poller.hand_pipes(False)
        drive.stop_soon()
