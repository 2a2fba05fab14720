"""The dispatcher: one thread in the parent that owns every worker and every queued task.

Data flow of one task::

    caller thread / event loop          dispatcher thread                 worker process
    --------------------------          -----------------                 --------------
    submit_execute(args)
      pickle args (bad args fail here)
      dispatcher.submit(task) ------->  drain inbox -> PendingQueue
                                         free worker + due batch?
                                           future -> running
                                           send (EXEC|BATCH) ----------->  execute(...)
                                         poll(pipes, sentinels, wakeup)    |
                                           results <----------------------  RESULTS
                                           future.set_result(...)
    future done / asyncio woken <------

Only the dispatcher thread touches a worker's pipe, its task table and the pending queue;
callers talk to it through a small API (``submit``, ``add_worker``, ``cancelled``,
``abandoned``, ``close``, ``snapshot``) that appends typed messages to ``inbox`` and writes
to a wakeup pipe. It sleeps in ``poll`` on every worker pipe, every process sentinel and the
wakeup pipe, so a worker that dies, busy or idle, is noticed at once. It knows exactly which
tasks each worker holds, so a death fails those tasks and nothing else.

This module is the scheduling half; ``_lifecycle.WorkerLifecycle`` (its base class) starts,
reaps, restarts and stops the worker processes.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import _messages as m
from ._batching import BatchCounter, PendingQueue
from ._lifecycle import WorkerLifecycle
from ._restart import RestartPolicy
from ._slot import FrameWriter, WorkerSlot
from ._states import LIVE_STATES, TaskState, WorkerState
from ._stats import PoolStats, TimeRecorder, WorkerStats
from ._task import Task, settle
from ._transport import Transport
from .errors import NoWorkersError, PoolClosedError, TaskTimeoutError

logger = logging.getLogger("stateful_pool")

W = WorkerState
T = TaskState
_DONE = object()
# The deadline heap is pruned of finished tasks once it holds this many entries and more than
# twice the tasks still queued or running (so pruning stays amortised O(1) per task).
_PRUNE_AT = 1024


# ---- what callers put in the inbox (besides a Task to run) ------------------------------------

@dataclass(slots=True)
class StartWorker:
    slot: WorkerSlot


@dataclass(slots=True)
class Cancelled:
    task: Task


@dataclass(slots=True)
class Close:
    cancel_futures: bool
    timeout: float | None
    kill: bool


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class Dispatcher(WorkerLifecycle):
    def __init__(
        self,
        *,
        worker_cls: type,
        transport: Transport,
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
        self.prefetch = prefetch
        self._restart_args = (max_restarts, restart_window, restart_backoff)
        self.release_slot = release_slot

        self.pending: PendingQueue[Task] = PendingQueue(max_batch_size, max_batch_wait)
        self.batches = BatchCounter()
        self.inbox: deque[Task | StartWorker | Cancelled | Close] = deque()
        self.slots: list[WorkerSlot] = []
        self.idle: deque[WorkerSlot] = deque()
        self.deadlines: list[tuple[float, int, Task]] = []
        self.counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0,
                       "timed_out": 0, "restarts": 0}
        self.queue_wait = TimeRecorder()
        self.run_time = TimeRecorder()
        self._worker_ids = iter(range(1 << 62)).__next__

        # Held by callers while they check `accepting` and append to the inbox, so that
        # nothing lands in the inbox after the dispatcher's last look at it.
        self._lock = threading.Lock()
        # Held by the dispatcher thread whenever it is not asleep in poll(): a caller that
        # gets it may hand a task straight to an idle worker (see try_run_now).
        self._sched = threading.Lock()
        self.accepting = True
        self.closing = False
        self.cancel_on_close = False
        self.kill_on_close = False
        self.close_deadline: float | None = None
        self._timers_armed = False
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

    # ---- the API callers use, from any thread ---------------------------------------------

    def submit(self, task: Task) -> bool:
        """Queue a task; False if the pool no longer accepts any."""
        with self._lock:
            if not self.accepting:
                return False
            self.inbox.append(task)
        self.wake()
        return True

    def try_run_now(self, task: Task) -> bool:
        """The fast path: if a worker is idle and nothing waits before this task, send it
        from the caller's thread, saving the round trip through the dispatcher thread. The
        task is registered on its worker exactly as the dispatcher would, so crashes,
        timeouts and shutdown treat it the same. False: use ``submit``."""
        payload = task.payload
        if (self.batching or self.inbox or not self.idle or type(payload) is not bytes
                or len(payload) > m.INLINE_MAX or not self._sched.acquire(blocking=False)):
            return False
        try:
            if not self.idle or self.pending or self.inbox or self.closing:
                return False
            slot = self.idle[0]
            if slot.conn is None or (slot.writer is not None and not slot.writer.idle.is_set()):
                return False
            with self._lock:
                if not self.accepting:
                    return False
                self.idle.popleft()
            self.counts["submitted"] += 1
            task.set_running_or_notify_cancel()
            task.state = T.RUNNING
            now = time.monotonic()
            if task.deadline is not None:
                heapq.heappush(self.deadlines, (task.deadline, task.id, task))
            self._send(slot, [task], now)
        finally:
            self._sched.release()
        if task.deadline is not None or self.hang_timeout is not None:
            self.wake()  # the dispatcher's next timer may be sooner now
        return True

    def add_worker(self, spawn_payload: bytes, future: Future[Any],
                   options: dict[str, Any]) -> bool:
        """Start one more worker; ``future`` gets what its spawn returned. False if closed."""
        with self._lock:
            if not self.accepting:
                return False
            slot = WorkerSlot(self._worker_ids(), spawn_payload, future, options,
                              RestartPolicy(*self._restart_args))
            self.slots.append(slot)
            self.inbox.append(StartWorker(slot))
        self.wake()
        return True

    def cancelled(self, task: Task) -> None:
        """A queued task was cancelled by its caller: take it off the queue."""
        self.inbox.append(Cancelled(task))
        self.wake()

    def abandoned(self, task: Task) -> None:
        """A running task's caller stopped waiting; shutdown will not wait for it."""
        task.abandoned = True
        self.wake()

    def close(self, cancel_futures: bool, timeout: float | None, kill: bool = False) -> None:
        """Stop accepting; finish (or cancel) the queue; wait at most ``timeout`` for running
        tasks; ``kill``: stop every worker at once with SIGKILL (a second Ctrl-C)."""
        if kill:
            self.kill_on_close = True  # seen at once, even mid-way through stopping
        with self._lock:
            self.inbox.append(Close(cancel_futures, timeout, kill))
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the dispatcher thread to end (every worker stopped); not from itself."""
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

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

    def snapshot(self) -> PoolStats:
        """Workers, queue and counters at about this moment (no lock; cheap)."""
        workers = tuple(
            WorkerStats(worker_id=s.id, pid=s.pid, state=s.state, tasks_done=s.tasks_done,
                        restarts=s.restarts.total, running=len(s.tasks),
                        last_exitcode=s.last_exitcode, host=s.location.get("host"),
                        node=s.location.get("node"),
                        gpu_ids=tuple(s.location.get("gpu_ids", ())),
                        run_time=s.run_time.snapshot())
            for s in list(self.slots))
        # Cancelled tasks leave the queue at once for callers, even before the dispatcher
        # has drained the news.
        waiting = self.pending.snapshot() + [t for t in list(self.inbox) if isinstance(t, Task)]
        queued = sum(not t.cancelled() for t in waiting)
        counts, b = dict(self.counts), self.batches
        return PoolStats(
            workers=workers, queue_depth=queued,
            in_flight=queued + sum(w.running for w in workers),
            submitted=counts["submitted"], completed=counts["completed"],
            failed=counts["failed"], cancelled=counts["cancelled"],
            timed_out=counts["timed_out"], restarts=counts["restarts"], batches=b.batches,
            batch_size_mean=b.mean, batch_size_max=b.largest,
            batch_size_hist=dict(b.histogram), queue_wait=self.queue_wait.snapshot(),
            run_time=self.run_time.snapshot())

    # ---- the dispatcher thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.exception("stateful_pool dispatcher failed; failing every task and stopping")
            self._fail_all(lambda: PoolClosedError("the pool's dispatcher failed; see the log"))
        finally:
            with self._sched, self._lock:
                self.accepting = False  # from now on no caller sends to a worker either
            self._stop_workers()
            self._refuse_inbox()
            self._wake_flag = True  # no caller writes to the wakeup pipe from now on

    def _loop(self) -> None:
        sched = self._sched
        sched.acquire()
        try:
            while True:
                timeout = self._step()
                if timeout is _DONE:
                    return
                sched.release()
                try:
                    events = self._poller.poll(None if timeout is None else timeout * 1000.0)
                finally:
                    sched.acquire()
                self._handle(events)
        finally:
            sched.release()

    def _step(self) -> Any:
        """One round of scheduling; returns the poll timeout (seconds or None) or _DONE."""
        self._drain_inbox()
        now = time.monotonic()
        if len(self.deadlines) > _PRUNE_AT and len(self.deadlines) > 2 * self._live_tasks():
            self._prune_deadlines()
        if self.deadlines and self.deadlines[0][0] <= now:
            self._expire_tasks(now)
        if self.hang_timeout is not None or self._timers_armed:
            self._check_worker_timers(now)
        self._dispatch(now)
        if self.closing and self._drained(now):
            return _DONE
        return self._next_timer(now)

    def _handle(self, events: list[tuple[int, int]]) -> None:
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
            if type(item) is Task:
                self._accept(item)
            elif isinstance(item, StartWorker):
                self._start_process(item.slot)
            elif isinstance(item, Cancelled):
                if self.pending.remove(item.task.id) is not None:
                    self.counts["cancelled"] += 1
            elif isinstance(item, Close):
                self._on_close(item)

    def _on_close(self, close: Close) -> None:
        self.closing = True
        self.cancel_on_close = self.cancel_on_close or close.cancel_futures
        if close.timeout is not None:
            deadline = time.monotonic() + close.timeout
            if self.close_deadline is None or deadline < self.close_deadline:
                self.close_deadline = deadline
        if self.cancel_on_close:
            for task in self.pending.pop_all():
                if task.cancel():
                    self.counts["cancelled"] += 1
                task.state = T.DONE

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
                if slot.state != W.BUSY or slot.messages != depth or slot.kill_reason:
                    continue
                started = [t for t in pending.next_batch(now) if self._start(t)]
                if started:
                    self._send(slot, started, now)

    def _start(self, task: Task) -> bool:
        """Move a task taken off the queue to running; False if it was cancelled."""
        if task.holds_slot:
            self.release_slot(task)
        if task.set_running_or_notify_cancel():
            task.state = T.RUNNING
            return True
        task.state = T.DONE
        self.counts["cancelled"] += 1
        return False

    def _send(self, slot: WorkerSlot, tasks: list[Task], now: float) -> None:
        record_wait = self.queue_wait.record
        for task in tasks:
            slot.tasks[task.id] = task
            task.started_at = now
            record_wait(now - task.submitted_at)
        if slot.state != W.BUSY:
            slot.state = W.BUSY
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
            if any(t.context is not None for t in tasks):
                key = (key, [t.context for t in tasks])
        else:
            kind, key = m.EXEC, tasks[0].id
            if tasks[0].context is not None:
                key = (key, tasks[0].context)
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

    def _on_message(self, slot: WorkerSlot, message: tuple[Any, ...]) -> None:
        kind, metas, blobs = message
        outcomes = m.join_outcomes(metas, blobs)
        if kind == m.RESULTS:
            done = [(task, outcome) for task_id, outcome in outcomes
                    if (task := slot.tasks.pop(task_id, None)) is not None]
            now = time.monotonic()
            for task, _ in done:
                slot.run_time.record(now - task.started_at)
                self.run_time.record(now - task.started_at)
            slot.tasks_done += len(outcomes)
            slot.messages -= 1
            if not slot.tasks and slot.state == W.BUSY:
                slot.state = W.IDLE
                slot.messages = 0
                self.idle.append(slot)
                if self.pending and not slot.reaping:
                    # The worker's next task goes out before the callers are woken: resolving
                    # futures runs their callbacks, and the worker would idle meanwhile.
                    if self.deadlines and self.deadlines[0][0] <= now:
                        self._expire_tasks(now)  # never send what has expired
                    self._dispatch(now)
            elif slot.messages:
                slot.busy_since = now  # its next (prefetched) message starts now
            for task, outcome in done:
                ok, value = m.rebuild_outcome(outcome)
                if ok:
                    self._finish(task, value)
                else:
                    self._finish(task, exc=value)
        elif kind == m.SPAWNED:
            self._on_spawned(slot, outcomes[0][1])

    def _prune_deadlines(self) -> None:
        """Drop the finished tasks from the deadline heap. Each entry keeps its task (and its
        result) alive until the deadline: with a long timeout that is minutes of traffic, and
        the garbage collector's full passes over it showed as 100 ms latency spikes."""
        self.deadlines = [entry for entry in self.deadlines if not entry[2].done()]
        heapq.heapify(self.deadlines)

    def _live_tasks(self) -> int:
        """Tasks queued or running (an upper bound on the heap's entries still needed)."""
        return len(self.pending) + sum(len(slot.tasks) for slot in self.slots)

    def _expire_tasks(self, now: float) -> None:
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, task = heapq.heappop(deadlines)
            if task.state == T.DONE or task.done():
                continue
            if task.state == T.QUEUED:
                self.pending.remove(task.id)
                if task.holds_slot:
                    self.release_slot(task)
                where = "before it started; it will not run"
            else:
                where = "while running; its result will be discarded"
            self.counts["timed_out"] += 1
            task.state = T.DONE
            settle(task, exc=TaskTimeoutError(f"task timed out {where}"))

    def _next_timer(self, now: float) -> float | None:
        times: list[float] = []
        if self.deadlines:
            times.append(self.deadlines[0][0])
        if self.idle:
            due = self.pending.due_at()
            if due is not None:
                times.append(due)
        if self.hang_timeout is not None or self._timers_armed:
            times.extend(self._worker_timer_times())
        if self.closing and self.close_deadline is not None:
            times.append(self.close_deadline)
        if not times:
            return None
        return max(0.0, min(times) - now)

    def _finish(self, task: Task, result: Any = None, exc: BaseException | None = None) -> None:
        if task.holds_slot:
            self.release_slot(task)
        task.state = T.DONE
        # Counted before the caller can wake and read stats(); a task that timed out or was
        # cancelled earlier keeps that outcome, and this one is dropped (and not counted).
        key = "completed" if exc is None else "failed"
        self.counts[key] += 1
        if not settle(task, result, exc):
            self.counts[key] -= 1

    def _drained(self, now: float) -> bool:
        """Whether shutdown may stop the workers: nothing queued, and no running task that a
        caller still waits for (or the close deadline has passed)."""
        if self.kill_on_close:
            return True
        if self.close_deadline is not None and now >= self.close_deadline:
            return True
        if self.pending:
            return False
        return not any(slot.state == W.STARTING or slot.holds_wanted_task()
                       for slot in self.slots)

    def _refuse_inbox(self) -> None:
        """After the last look: whatever still reached the inbox fails, nothing hangs."""
        while self.inbox:
            item = self.inbox.popleft()
            if type(item) is Task:
                self._finish(item, exc=PoolClosedError("the pool is shut down"))
            elif isinstance(item, StartWorker) and item.slot.spawn_future is not None:
                settle(item.slot.spawn_future, exc=PoolClosedError("the pool is shut down"))
