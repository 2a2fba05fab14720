"""The dispatcher: one thread in the parent that owns every worker and every queued task.

Data flow of one task::

    caller thread / event loop          dispatcher thread                 worker process
    --------------------------          -----------------                 --------------
    submit_execute(args)
      pickle args (bad args fail here)
      inbox.append(task), wake() ---->  drain inbox -> PendingQueue
                                         free worker + due batch?
                                           future -> running
                                           send (EXEC|BATCH) ----------->  execute(...)
                                         wait(pipes, sentinels, wakeup)    |
                                           results <----------------------  RESULTS
                                           future.set_result(...)
    future done / asyncio woken <------    (call_soon_threadsafe via wrap_future)

Only the dispatcher thread touches a worker's pipe, its task table and the pending queue;
callers talk to it through ``inbox`` (a deque, atomic append) and a wakeup pipe. It sleeps in
``poll`` on every worker pipe, every process sentinel and the wakeup
pipe, so a worker that dies, busy or idle, is noticed at once, not on the next poll. It knows
exactly which tasks each worker holds, so a death fails those tasks and nothing else.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import select
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection
from typing import Any

from . import _messages as m
from ._batching import BatchCounter, PendingQueue
from .errors import (
    NoWorkersError,
    PoolClosedError,
    SpawnError,
    SpawnTimeoutError,
    TaskTimeoutError,
    WorkerCrashedError,
)

logger = logging.getLogger("stateful_pool")

# Worker states, as reported by stats().
STARTING = "starting"
IDLE = "idle"
BUSY = "busy"
RESTARTING = "restarting"
STOPPING = "stopping"
DEAD = "dead"
STOPPED = "stopped"
LIVE_STATES = frozenset({STARTING, IDLE, BUSY, RESTARTING})

# Task states.
QUEUED = 0
RUNNING = 1
DONE = 2

MAX_RESTART_DELAY = 10.0
# After shutdown asks an idle worker to stop, how long it may take before it is killed. It
# runs its close() hook and leaves with os._exit (no interpreter teardown), so milliseconds
# is the norm; a slow close() gets this long.
STOP_GRACE = 10.0
# A busy worker whose tasks nobody waits for any more is sent SIGTERM at shutdown, and
# SIGKILL if it is still there after this long.
TERM_GRACE = 1.0


class Task(Future[Any]):
    """One submitted task; it is also the future handed to the caller (one object per task).

    ``cancel()`` tells the pool at once, so a cancelled task leaves the queue and frees its
    place in ``queue_size`` without a done-callback on every task.
    """

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 holds_slot: bool, on_cancel: Callable[[Task], None]) -> None:
        super().__init__()
        self.id = task_id
        self.payload = payload
        self.deadline = deadline
        self.state = QUEUED
        self.holds_slot = holds_slot
        self.abandoned = False  # its caller stopped waiting while it ran (asyncio cancel)
        self._on_cancel = on_cancel

    @property
    def wanted(self) -> bool:
        """Whether a caller still waits for this task (not timed out, cancelled, abandoned)."""
        return not (self.abandoned or self.done())

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel(self)
        return cancelled


class WorkerSlot:
    """One worker of the pool; survives respawns (same id, same spawn arguments)."""

    def __init__(self, worker_id: int, spawn_payload: bytes, future: Future[Any],
                 options: dict[str, Any] | None = None) -> None:
        self.id = worker_id
        self.spawn_payload = spawn_payload
        self.options = options or {}
        self.location: dict[str, Any] = {}
        self.spawn_future: Future[Any] | None = future
        self.state = STARTING
        self.process: Any = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.tasks: dict[int, Task] = {}
        self.messages = 0  # EXEC/BATCH messages sent and not answered yet
        self.busy_since = 0.0
        self.spawn_deadline: float | None = None
        self.kill_reason = ""
        self.restart_at = 0.0
        self.restart_times: deque[float] = deque()
        self.restarts = 0
        self.tasks_done = 0
        self.last_exitcode: int | None = None
        self.writer: FrameWriter | None = None
        self.spawn_error: BaseException | None = None
        self.reaping = False


class FrameWriter:
    """Sends large messages to one worker from a thread of its own (one per worker, not per
    task). Jobs go out in order; ``idle`` is set when none is left."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self._lock = threading.Lock()
        self._queued = 0
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def send(self, conn: Connection, kind: int, key: Any, blobs: list[m.Payload]) -> None:
        with self._lock:
            self._queued += 1
            self.idle.clear()
        self._jobs.put((conn, kind, key, blobs))

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, kind, key, blobs = job
            try:
                m.send_message(conn.send_bytes, kind, key, blobs)
            except (OSError, TypeError):
                pass  # the worker died (its sentinel tells the dispatcher) or conn was closed
            finally:
                del job, blobs
                with self._lock:
                    self._queued -= 1
                    if not self._queued:
                        self.idle.set()


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


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


class Dispatcher:
    def __init__(
        self,
        *,
        worker_cls: type,
        transport: Any,
        batching: bool,
        max_batch_size: int,
        max_batch_wait: float,
        spawn_timeout: float | None,
        hang_timeout: float | None,
        max_restarts: int | None,
        prefetch: int,
        restart_window: float,
        restart_backoff: float,
        release_slot: Callable[[Task], None],
    ) -> None:
        self.worker_cls = worker_cls
        self.transport = transport
        self.batching = batching
        self.spawn_timeout = spawn_timeout
        self.hang_timeout = hang_timeout
        self.max_restarts = max_restarts
        self.prefetch = prefetch
        self.restart_window = restart_window
        self.restart_backoff = restart_backoff
        self.release_slot = release_slot

        self.pending: PendingQueue[Task] = PendingQueue(max_batch_size, max_batch_wait)
        self.batches = BatchCounter()
        self.inbox: deque[Any] = deque()
        self.slots: list[WorkerSlot] = []
        self.idle: deque[WorkerSlot] = deque()
        self.deadlines: list[tuple[float, int, Task]] = []
        self.counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0,
                       "timed_out": 0, "restarts": 0}

        # Held by submitters while they check `accepting` and append to the inbox, so that
        # nothing lands in the inbox after the dispatcher's last look at it.
        self.lock = threading.Lock()
        self.accepting = True
        self.closing = False
        self._timers_armed = False
        self.cancel_on_close = False
        self.kill_on_close = False
        self.close_deadline: float | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wake_flag = False
        # One poll object for the pool's life: fds are (un)registered as workers come and go,
        # instead of building a selector on every wakeup as multiprocessing's wait() does.
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._fd_owner: dict[int, tuple[WorkerSlot, bool]] = {}
        # Closed only when nothing can reach this object any more: a caller thread may still
        # call wake() after the dispatcher thread has ended, and a closed fd number gets reused.
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w).atexit = False
        self.thread = threading.Thread(target=self._run, name="stateful_pool-dispatcher",
                                       daemon=True)
        self.thread.start()

    # ---- called from any thread -------------------------------------------------------------

    def wake(self) -> None:
        if not self._wake_flag:
            self._wake_flag = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (dispatcher will wake anyway) or closed (it is gone)

    def has_live_worker(self) -> bool:
        if self.idle:  # the common case, answered without a walk
            return True
        return any(slot.state in LIVE_STATES for slot in self.slots)

    # ---- dispatcher thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.exception("stateful_pool dispatcher failed; failing every task and stopping")
            self._fail_all(lambda: PoolClosedError("the pool's dispatcher failed; see the log"))
        finally:
            with self.lock:
                self.accepting = False
            self._stop_workers()
            self._wake_flag = True  # no caller writes to the wakeup pipe from now on

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            now = time.monotonic()
            if self.deadlines and self.deadlines[0][0] <= now:
                self._expire_tasks(now)
            if self._timed_slots:
                self._check_worker_timers(now)
            self._dispatch(now)
            if self.closing and self._drained(now):
                return
            timeout = self._next_timer(now)
            events = self._poller.poll(None if timeout is None else timeout * 1000.0)
            for fd, _ in events:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    self._wake_flag = False
                    continue
                owner = self._fd_owner.get(fd)
                if owner is None:
                    continue  # unregistered by an earlier event of this round
                slot, is_pipe = owner
                if is_pipe:
                    self._on_readable(slot)
                else:
                    self._on_exit(slot)

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, Task):
                self._accept(item)
            elif isinstance(item, WorkerSlot):
                self._start_process(item)
            elif item[0] == "cancelled":
                if self.pending.remove(item[1].id) is not None:
                    self.counts["cancelled"] += 1
            elif item[0] == "close":
                self.closing = True
                self.cancel_on_close = self.cancel_on_close or item[1]
                self.kill_on_close = self.kill_on_close or item[3]
                if item[2] is not None:
                    deadline = time.monotonic() + item[2]
                    if self.close_deadline is None or deadline < self.close_deadline:
                        self.close_deadline = deadline
                if self.cancel_on_close:
                    for task in self.pending.pop_all():
                        if task.cancel():
                            self.counts["cancelled"] += 1
                        task.state = DONE

    def _accept(self, task: Task) -> None:
        self.counts["submitted"] += 1
        if not self.idle and not self.has_live_worker():
            self._finish(task, exc=NoWorkersError("the pool has no live worker"))
            return
        self.pending.push(task.id, task, time.monotonic())
        if task.deadline is not None:
            heapq.heappush(self.deadlines, (task.deadline, task.id, task))

    def _dispatch(self, now: float) -> None:
        pending, idle = self.pending, self.idle
        while pending and idle:
            batch = pending.next_batch(now)
            if not batch:
                return
            started = [task for task in batch if self._start(task)]
            if started:
                self._send(idle.popleft(), started, now)
        if self.prefetch and pending:
            self._prefetch(now)

    def _prefetch(self, now: float) -> None:
        """Opt-in: every worker is busy and tasks still wait, so hand busy workers more, up to
        ``prefetch`` messages beyond the one each runs; it hides the round trip per task."""
        pending = self.pending
        for depth in range(1, self.prefetch + 1):
            for slot in self.slots:
                if not pending:
                    return
                if slot.state != BUSY or slot.messages != depth or slot.kill_reason:
                    continue
                started = [t for t in pending.next_batch(now) if self._start(t)]
                if started:
                    self._send(slot, started, now)

    def _start(self, task: Task) -> bool:
        """Move a task taken off the queue to running; False if it was cancelled."""
        if task.holds_slot:
            self.release_slot(task)
        if task.set_running_or_notify_cancel():
            task.state = RUNNING
            return True
        task.state = DONE
        self.counts["cancelled"] += 1
        return False

    def _send(self, slot: WorkerSlot, tasks: list[Task], now: float) -> None:
        for task in tasks:
            slot.tasks[task.id] = task
        if slot.state != BUSY:
            slot.state = BUSY
            slot.busy_since = now
        slot.messages += 1
        payloads = [t.payload for t in tasks]
        for task in tasks:
            task.payload = b""  # the worker gets it now; free the memory with the message
        assert slot.conn is not None
        key: Any
        if self.batching:
            self.batches.record(len(tasks))
            kind, key = m.BATCH, [t.id for t in tasks]
        else:
            kind, key = m.EXEC, tasks[0].id
        writer_busy = slot.writer is not None and not slot.writer.idle.is_set()
        # Messages to one worker must not interleave: once one goes through the writer, the
        # ones queued behind it (prefetch) follow the same path.
        if writer_busy or any(type(p) is tuple or len(p) > m.INLINE_MAX for p in payloads):
            # A large message takes the pipe's speed to cross (0.5 ms per MiB here): written
            # from this thread, it would hold every other worker's dispatch up meanwhile.
            if slot.writer is None:
                slot.writer = FrameWriter(f"stateful_pool-writer-{slot.id}")
            slot.writer.send(slot.conn, kind, key, payloads)
            return
        try:
            slot.conn.send_bytes(m.dumps((kind, key, payloads), m.PROTOCOL))
        except OSError:
            pass  # the worker died; its sentinel fires next and fails these tasks

    def _on_readable(self, slot: WorkerSlot) -> None:
        assert slot.conn is not None
        try:
            message = m.recv_message(slot.conn.recv_bytes)
        except (EOFError, OSError):
            self._on_exit(slot)
        else:
            self._on_message(slot, message)

    @staticmethod
    def _wait_writer(slot: WorkerSlot) -> None:
        """Let an in-flight large send fail on the dead worker before its fd is closed (a
        closed fd number is soon reused)."""
        if slot.writer is not None and not slot.writer.idle.wait(5.0):
            logger.error("writer of worker %d still blocked after its death", slot.id)

    def _watch(self, slot: WorkerSlot) -> None:
        assert slot.conn is not None
        for fd, is_pipe in ((slot.conn.fileno(), True), (slot.process.sentinel, False)):
            self._fd_owner[fd] = (slot, is_pipe)
            self._poller.register(fd, select.POLLIN)

    def _unwatch(self, slot: WorkerSlot) -> None:
        assert slot.conn is not None
        for fd in (slot.conn.fileno(), slot.process.sentinel):
            if self._fd_owner.pop(fd, None) is not None:
                self._poller.unregister(fd)

    def _on_message(self, slot: WorkerSlot, message: tuple[Any, ...]) -> None:
        kind, metas, blobs = message
        outcomes = m.join_outcomes(metas, blobs)
        if kind == m.RESULTS:
            for task_id, outcome in outcomes:
                task = slot.tasks.pop(task_id, None)
                if task is None:
                    continue
                ok, value = m.rebuild_outcome(outcome)
                if ok:
                    self._finish(task, value)
                else:
                    self._finish(task, exc=value)
            slot.tasks_done += len(outcomes)
            slot.messages -= 1
            if not slot.tasks and slot.state == BUSY:
                slot.state = IDLE
                slot.messages = 0
                self.idle.append(slot)
            elif slot.messages:
                slot.busy_since = time.monotonic()  # its next (prefetched) message starts now
        elif kind == m.SPAWNED:
            self._on_spawned(slot, outcomes[0][1])

    def _on_spawned(self, slot: WorkerSlot, outcome: m.Outcome) -> None:
        ok, value = m.rebuild_outcome(outcome)
        slot.spawn_deadline = None
        future, slot.spawn_future = slot.spawn_future, None
        if ok:
            slot.state = IDLE
            slot.pid = slot.process.pid  # a Ray actor's pid is known only now
            slot.location = dict(getattr(slot.process, "location", None) or {})
            self.idle.append(slot)
            if future is not None:
                settle(future, value)
            else:
                logger.info("worker %d respawned (pid %s)", slot.id, slot.pid)
            return
        # spawn() raised (or its result could not be sent): the process is exiting. Reap it
        # before the caller hears, so that no process outlives the failed spawn.
        slot.kill_reason = "spawn_failed"
        slot.spawn_error = value
        slot.spawn_future = future
        if not slot.reaping:
            self._on_exit(slot)

    # ---- worker lifecycle -------------------------------------------------------------------

    def _start_process(self, slot: WorkerSlot) -> None:
        slot.state = STARTING
        slot.kill_reason = ""
        try:
            parent_conn, process = self.transport.start(self.worker_cls, slot.id, slot.options)
        except Exception as exc:
            logger.exception("could not start worker %d", slot.id)
            self._lose_worker(slot, SpawnError(f"could not start worker {slot.id}: {exc!r}"))
            return
        slot.process, slot.conn, slot.pid = process, parent_conn, process.pid
        self._watch(slot)
        if self.spawn_timeout is not None:
            slot.spawn_deadline = time.monotonic() + self.spawn_timeout
            self._timers_armed = True
        try:
            m.send_message(parent_conn.send_bytes, m.SPAWN, None, [slot.spawn_payload])
        except OSError:
            pass  # died at once; the sentinel tells

    def _on_exit(self, slot: WorkerSlot) -> None:
        """The worker's process ended (or its pipe broke): reap it and fail what it held."""
        conn = slot.conn
        assert conn is not None
        # Results the worker sent just before dying still count.
        slot.reaping = True
        try:
            while conn.poll():
                self._on_message(slot, m.recv_message(conn.recv_bytes))
        except (EOFError, OSError):
            pass
        finally:
            slot.reaping = False
        slot.process.join(1.0)
        if slot.process.exitcode is None:  # pipe broke but the process lingers
            slot.process.kill()
            slot.process.join()
        exitcode = slot.process.exitcode
        slot.last_exitcode = exitcode
        self._unwatch(slot)
        self._wait_writer(slot)
        conn.close()
        slot.conn = None
        if slot in self.idle:
            self.idle.remove(slot)
        pid = slot.pid
        how = getattr(slot.process, "death_cause", None) or describe_exit(exitcode)
        was, reason = slot.state, slot.kill_reason

        if was == STOPPING:
            slot.state = STOPPED
            return
        if was == STARTING:
            if reason == "spawn_failed":
                error: BaseException | None = slot.spawn_error
                slot.spawn_error = None
                if slot.spawn_future is None:
                    logger.error("worker %d failed to respawn: %r", slot.id, error)
            elif reason == "spawn_timeout":
                error = SpawnTimeoutError(
                    f"worker {slot.id} (pid {pid}) did not finish spawn within "
                    f"{self.spawn_timeout} s and was killed")
            else:
                error = SpawnError(f"worker {slot.id} (pid {pid}) died during spawn with {how}")
            future, slot.spawn_future = slot.spawn_future, None
            if future is not None:  # a first spawn: the caller learns, no respawn
                if error is not None:
                    settle(future, exc=error)
                self._lose_worker(slot, None, forget=True)
            else:  # a respawn that failed: try again under the budget
                self._schedule_restart(slot)
            return

        if reason == "hang_timeout":
            why = f"it was killed after running a task for more than {self.hang_timeout} s"
        else:
            why = f"it died with {how}"
        tasks = list(slot.tasks.values())
        slot.tasks.clear()
        slot.messages = 0
        if tasks:
            logger.warning("worker %d (pid %s) lost %d task(s): %s", slot.id, pid, len(tasks), why)
        else:
            logger.warning("worker %d (pid %s) exited while idle: %s", slot.id, pid, why)
        for task in tasks:
            self._finish(task, exc=WorkerCrashedError(
                f"worker {slot.id} (pid {pid}) crashed while holding this task: {why}",
                worker_id=slot.id, pid=pid, exitcode=exitcode,
                reason=reason or "crashed"))
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        now = time.monotonic()
        while slot.restart_times and slot.restart_times[0] < now - self.restart_window:
            slot.restart_times.popleft()
        budget_left = self.max_restarts is None or len(slot.restart_times) < self.max_restarts
        if self.closing and not self.pending:
            slot.state = STOPPED
            return
        if not budget_left:
            logger.error("worker %d gave up: %d restarts within %.0f s (max_restarts=%s)",
                         slot.id, len(slot.restart_times), self.restart_window, self.max_restarts)
            self._lose_worker(slot, None)
            return
        delay = min(self.restart_backoff * (2 ** len(slot.restart_times)), MAX_RESTART_DELAY)
        slot.state = RESTARTING
        slot.restart_at = now + delay
        self._timers_armed = True

    def _lose_worker(self, slot: WorkerSlot, error: BaseException | None,
                     forget: bool = False) -> None:
        """Take a worker out of service for good; fail queued tasks if it was the last one."""
        slot.state = DEAD
        if error is not None and slot.spawn_future is not None:
            settle(slot.spawn_future, exc=error)
            slot.spawn_future = None
        if forget and slot in self.slots:
            self.slots.remove(slot)
        if not self.has_live_worker():
            for task in self.pending.pop_all():
                self._finish(task, exc=NoWorkersError(
                    "the pool has no live worker left (spawn failed or restart budget spent)"))

    @property
    def _timed_slots(self) -> bool:
        """Whether any worker has a timer running (restart, spawn or hang deadline)."""
        return self.hang_timeout is not None or self._timers_armed

    def _check_worker_timers(self, now: float) -> None:
        armed = False
        for slot in self.slots:
            if slot.state == RESTARTING or (slot.state == STARTING
                                            and slot.spawn_deadline is not None):
                armed = True
            state = slot.state
            if state == RESTARTING and slot.restart_at <= now:
                slot.restart_times.append(now)
                slot.restarts += 1
                self.counts["restarts"] += 1
                logger.info("respawning worker %d (restart %d)", slot.id, slot.restarts)
                self._start_process(slot)
            elif (state == STARTING and slot.spawn_deadline is not None
                  and slot.spawn_deadline <= now and slot.kill_reason == ""):
                slot.kill_reason = "spawn_timeout"
                slot.process.kill()
            elif (state == BUSY and self.hang_timeout is not None
                  and slot.busy_since + self.hang_timeout <= now and slot.kill_reason == ""):
                slot.kill_reason = "hang_timeout"
                slot.process.kill()
        self._timers_armed = armed

    def _expire_tasks(self, now: float) -> None:
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, task = heapq.heappop(deadlines)
            if task.state == DONE or task.done():
                continue
            if task.state == QUEUED:
                self.pending.remove(task.id)
                if task.holds_slot:
                    self.release_slot(task)
                where = "before it started; it will not run"
            else:
                where = "while running; its result will be discarded"
            self.counts["timed_out"] += 1
            task.state = DONE
            settle(task, exc=TaskTimeoutError(f"task timed out {where}"))

    def _next_timer(self, now: float) -> float | None:
        times: list[float] = []
        if self.deadlines:
            times.append(self.deadlines[0][0])
        if self.idle:
            due = self.pending.due_at()
            if due is not None:
                times.append(due)
        for slot in (self.slots if self._timed_slots else ()):
            if slot.state == RESTARTING:
                times.append(slot.restart_at)
            elif slot.state == STARTING and slot.spawn_deadline is not None:
                times.append(slot.spawn_deadline)
            elif slot.state == BUSY and self.hang_timeout is not None:
                times.append(slot.busy_since + self.hang_timeout)
        if self.closing and self.close_deadline is not None:
            times.append(self.close_deadline)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _finish(self, task: Task, result: Any = None, exc: BaseException | None = None) -> None:
        if task.holds_slot:
            self.release_slot(task)
        task.state = DONE
        # A task that timed out or was cancelled earlier keeps that outcome; this one is dropped.
        if settle(task, result, exc):
            self.counts["completed" if exc is None else "failed"] += 1

    def request_close(self, cancel_futures: bool, timeout: float | None,
                      kill: bool = False) -> None:
        """Stop accepting; finish (or cancel) the queue; wait at most ``timeout`` for running
        tasks; ``kill``: stop every worker at once with SIGKILL (a second Ctrl-C)."""
        with self.lock:
            self.inbox.append(("close", cancel_futures, timeout, kill))
        self.wake()

    # ---- shutdown ---------------------------------------------------------------------------

    def _drained(self, now: float) -> bool:
        if self.close_deadline is not None and now >= self.close_deadline:
            return True
        if self.pending:
            return False
        # Running tasks whose callers have all gone (timed out, cancelled) are not waited for.
        return not any(slot.state == STARTING
                       or any(task.wanted for task in slot.tasks.values())
                       for slot in self.slots)

    def _stop_workers(self) -> None:
        """Ask every worker to stop, kill the ones that do not, and fail whatever is left."""
        for task in self.pending.pop_all():
            if not task.cancel():
                self._finish(task, exc=PoolClosedError("the pool shut down before this task ran"))
        now = time.monotonic()
        deadlines: dict[int, float] = {}
        for slot in self.slots:
            if slot.conn is not None:
                deadlines[slot.id] = now + self._stop_one(slot)
            if slot.state in LIVE_STATES:
                slot.state = STOPPING
        for slot in self.slots:
            if slot.process is None or slot.conn is None:
                slot.state = STOPPED if slot.state != DEAD else DEAD
                continue
            self._join_unless_killed(slot, deadlines[slot.id])
            if slot.process.exitcode is None:
                if not self.kill_on_close:
                    logger.warning("worker %d did not stop within %.0f s; killing it",
                                   slot.id, deadlines[slot.id] - now)
                slot.process.kill()
                slot.process.join()
            for task in slot.tasks.values():
                self._finish(task, exc=PoolClosedError(
                    "the pool shut down before this task finished"))
            slot.tasks.clear()
            if slot.spawn_future is not None:  # killed mid-spawn at the shutdown deadline
                settle(slot.spawn_future, exc=PoolClosedError(
                    "the pool shut down before this worker finished spawning"))
                slot.spawn_future = None
            self._unwatch(slot)
            self._wait_writer(slot)
            slot.conn.close()
            slot.conn = None
            slot.state = STOPPED if slot.state != DEAD else DEAD
        self.idle.clear()
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.close()
        self._drain_inbox_after_close()

    def _join_unless_killed(self, slot: WorkerSlot, deadline: float) -> None:
        """Wait for a worker to exit until ``deadline``, or until a kill is requested."""
        while not self.kill_on_close:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            slot.process.join(min(left, 0.05))
            if slot.process.exitcode is not None:
                return

    def _stop_one(self, slot: WorkerSlot) -> float:
        """Tell one worker to stop; return how long it may take before it is killed."""
        if self.kill_on_close:
            slot.process.kill()
            return 0.0
        if slot.state == STARTING or any(task.wanted for task in slot.tasks.values()):
            slot.process.kill()  # still working for a caller, past the drain deadline
            return 0.0
        if slot.state == BUSY:  # only tasks nobody waits for: no need to be gentle
            terminate = getattr(slot.process, "terminate", slot.process.kill)
            terminate()
            return TERM_GRACE
        try:
            m.send_message(slot.conn.send_bytes, m.STOP, None, None)  # type: ignore[union-attr]
        except OSError:
            pass
        return STOP_GRACE

    def _drain_inbox_after_close(self) -> None:
        while self.inbox:
            item = self.inbox.popleft()
            if isinstance(item, Task):
                self._finish(item, exc=PoolClosedError("the pool is shut down"))
            elif isinstance(item, WorkerSlot) and item.spawn_future is not None:
                settle(item.spawn_future, exc=PoolClosedError("the pool is shut down"))

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        for task in self.pending.pop_all():
            self._finish(task, exc=make_error())
        for slot in self.slots:
            for task in slot.tasks.values():
                self._finish(task, exc=make_error())
            slot.tasks.clear()
            if slot.spawn_future is not None:
                settle(slot.spawn_future, exc=make_error())
