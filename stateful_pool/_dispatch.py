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

The dispatcher thread owns the workers' pipes, their task tables and the pending queue;
callers talk to it through a small API (``submit``, ``add_worker``, ``cancelled``,
``abandoned``, ``close``, ``snapshot``) that appends typed messages to ``inbox`` and writes
to a wakeup pipe. It sleeps in ``poll`` on every worker pipe, every process sentinel and the
wakeup pipe, so a worker that dies, busy or idle, is noticed at once. It knows exactly which
tasks each worker holds, so a death fails those tasks and nothing else.

Two shortcuts skip the dispatcher thread, both under ``_sched``, the lock it holds whenever
it is awake, so the state they change is never changed by two threads at once:

* the fast path (``try_run_now``): a caller that finds a worker idle and nothing queued
  sends its task itself;
* the lent pipe (``try_run_now(lend=True)``): a caller that will wait for that very task
  (``execute``, ``async_execute``) also reads the answer itself, from its thread or its
  event loop, then gives the pipe back (``reclaim``). Meanwhile the pipe is paused in the
  dispatcher's epoll and the dispatcher leaves it alone, but it still watches the process,
  times the task and takes the pipe back when it needs it: the worker died, tasks queue,
  the pool closes. A hop to a worker then costs one write and one read in the caller, and
  no wakeup of another thread in either direction.

This module is the scheduling: queue, dispatch, results, timeouts; ``_stream_dispatch``
adds what is particular to streams (chunks, credit, stops, their time limits, continuous
batching). Its base classes deal with the processes: ``_lifecycle.WorkerLifecycle``
starts, reaps and restarts them; ``_shutdown.WorkerShutdown`` decides when the pool may stop
and stops them.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from . import _messages as m
from . import _outcomes as o
from ._batching import PendingQueue
from ._config import PoolConfig
from ._deadlines import PRUNE_AT, Deadlines
from ._drive import LoopDriving
from ._inbox import Cancelled, Close, Credit, Message, Reclaim, StartWorker, StopStream
from ._poll import Poller
from ._restart import MAX_RESTART_DELAY, RestartPolicy
from ._shutdown import WorkerShutdown
from ._slot import WorkerSlot
from ._states import LIVE_STATES, TaskState, WorkerState
from ._stats import Counters, PoolStats
from ._stream import Stream
from ._stream_dispatch import StreamScheduling
from ._task import LoopTask, Task, ThreadTask, mark_dispatcher_thread, settle
from ._transport import Transport
from .errors import NoWorkersError, PoolClosedError, TaskTimeoutError

logger = logging.getLogger("stateful_pool")

W = WorkerState
T = TaskState
_DONE = object()
# How often a caller waiting on a lent pipe checks that it still holds it (the dispatcher may
# have taken it back while the caller slept on the fds).
_LENT_CHECK = 0.5


class Lent(NamedTuple):
    """A worker's pipe lent to the caller of ``task`` (``Dispatcher.try_run_now``)."""

    slot: WorkerSlot
    task: Task
    fd: int
    sentinel: int
    conn: Any


class Dispatcher(LoopDriving, StreamScheduling, WorkerShutdown):
    def __init__(self, worker_cls: type, transport: Transport, config: PoolConfig,
                 batching: bool, release_slot: Callable[[Task], None],
                 streams_per_worker: int = 1) -> None:
        """``batching``: the worker defines ``execute_batch`` and ``max_batch_size > 1``.
        ``release_slot``: frees a task's place in ``queue_size`` once it leaves the queue.
        ``streams_per_worker``: with ``stream_step``, how many tasks a busy worker may hold
        (new ones join its running batch)."""
        self.worker_cls = worker_cls
        self.transport = transport
        self.batching = batching
        self.streams_per_worker = streams_per_worker
        self.spawn_timeout = config.spawn_timeout
        self.hang_timeout = config.hang_timeout
        self.prefetch = config.prefetch
        self._restart_args = (config.max_restarts, config.restart_window,
                              config.restart_backoff, MAX_RESTART_DELAY,
                              config.crash_loop_backoff, config.crash_loop_max_delay)
        self.release_slot = release_slot

        self.pending: PendingQueue[Task] = PendingQueue(
            config.max_batch_size if batching else 1, config.max_batch_wait if batching else 0)
        self.inbox: deque[Message] = deque()
        self.slots: list[WorkerSlot] = []
        self.idle: deque[WorkerSlot] = deque()
        self.deadlines: Deadlines[Task] = Deadlines()
        self.counts = Counters()
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
        # Owners of the watched fds: (worker, True) for its pipe, (worker, False) for its
        # process sentinel.
        self.poller: Poller[tuple[WorkerSlot, bool]] = Poller()
        # Whether a waiting caller may read its answer from the worker's pipe itself: the
        # pipe must be paused in the poller meanwhile (epoll), and the answer must be that
        # task's alone (no execute_batch, no stream_step batch).
        self._can_lend = self.poller.can_pause and not batching and streams_per_worker == 1
        # Whether an event loop may read every pipe itself (``_drive``): epoll only.
        self._init_driving(self.poller.can_pause)
        self.wake = self.poller.wake
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

    def try_run_now(self, task: Task, lend: bool = False) -> Lent | bool:
        """The fast path: if a worker is idle and nothing waits before this task, send it
        from the caller's thread, saving the round trip through the dispatcher thread. The
        task is registered on its worker exactly as the dispatcher would, so crashes,
        timeouts and shutdown treat it the same. False: use ``submit``.

        ``lend``: the caller will wait for this very task and read the answer from the
        worker's pipe itself (``wait_lent`` or an event loop's reader, then ``reclaim``),
        saving the hop through the dispatcher thread on the way back too. The dispatcher
        leaves the pipe alone until it is reclaimed; it still watches the process, so a
        crash, a timeout or shutdown take the pipe back. Returns the ``Lent`` pipe then
        (or True when it sent the task without lending)."""
        payload = task.payload
        if (self.batching or self.inbox or not self.idle or type(payload) is not bytes
                or len(payload) > m.INLINE_MAX or not self._sched.acquire(blocking=False)):
            return False
        lent: Lent | bool = True
        try:
            # (``accepting`` turns False under ``_sched`` too: no need for ``_lock`` here.)
            if (not self.idle or self.pending or self.inbox or self.closing
                    or not self.accepting):
                return False
            slot = self.idle[-1]  # the worker idle the shortest time (see _dispatch)
            conn = slot.conn
            if conn is None or (slot.writer is not None and not slot.writer.idle.is_set()):
                return False
            self.idle.pop()
            self.counts.submitted += 1
            task.set_running_or_notify_cancel()
            task.state = T.RUNNING
            now = time.monotonic()
            if task.deadline is not None:
                self.deadlines.push(task)
            if lend and self._can_lend:
                fd = conn.fileno()
                if not slot.paused:  # before the send: the answer is not the dispatcher's
                    self.poller.pause(fd)
                    slot.paused = True
                slot.lent = task
                lent = Lent(slot, task, fd, slot.process.sentinel, conn)
            elif slot.paused:
                self._arm(slot)
            self.counts.queue_wait.record(now - task.submitted_at)
            slot.send_tasks([task], False, now)
        finally:
            self._sched.release()
        if task.deadline is not None or self.hang_timeout is not None:
            self.wake()  # the dispatcher's next timer may be sooner now
        return lent

    def reclaim(self, lent: Lent, read: bool, readable: bool = False) -> bool:
        """The caller gives a lent pipe back (any thread). With ``read``, the answer waiting
        there is read and its task settled first, here, unless the dispatcher is busy: then
        the dispatcher takes the pipe back and reads it. ``readable``: the caller has just
        seen the pipe readable (no need to look again). True if a message was read here."""
        slot, task = lent.slot, lent.task
        if slot.lent is not task:
            return False  # taken back already: the worker died, or shutdown
        if not self._sched.acquire(blocking=False):
            self.inbox.append(Reclaim(slot, task))
            self.wake()
            return False
        frame = None
        given_back = idle = False
        try:
            if slot.lent is not task:
                return False
            slot.lent = None
            given_back = True
            conn = slot.conn
            assert conn is not None
            if read:
                try:
                    if readable or conn.poll(0):
                        frame = slot.recv_frame()
                except (EOFError, OSError):
                    pass  # died: the dispatcher hears it from the pipe or the sentinel
            if frame is not None:
                if frame[0] == m.RESULT1:
                    self._on_result1(slot, frame, dispatch=False)
                    idle = not slot.tasks
                else:
                    try:  # a message of several frames (a large result)
                        message = m.recv_message(conn.recv_bytes, frame)
                    except (EOFError, OSError):
                        return False  # died mid-message: its sentinel fails the task
                    if message.kind == m.Kind.RESULTS:
                        self._on_lent_results(slot, o.outcomes_of(message))
                    else:  # not the answer to an EXEC: not expected; the dispatcher's way
                        self._on_message(slot, message)
        finally:
            # After the usual answer the worker idles, and its pipe stays paused until it
            # gets a task whose answer is the dispatcher's to read. Otherwise (no answer yet,
            # another message, or an exception here: Ctrl-C) what is left is the
            # dispatcher's to read.
            if given_back and not idle:
                self._arm(slot)
            self._sched.release()
        if self.pending or self.inbox or self.closing:
            self.wake()
        return frame is not None

    def _arm(self, slot: WorkerSlot) -> None:
        """Have the poller report this worker's pipe again (its answers are the
        dispatcher's to read)."""
        slot.paused = False
        if slot.conn is not None:
            self.poller.resume(slot.conn.fileno())

    def _on_result1(self, slot: WorkerSlot, frame: bytes, dispatch: bool = True) -> None:
        """``_on_results`` for the usual answer: one task's result (a RESULT1 frame)."""
        task_id, name, blob = m.read_result1(frame)
        now = time.monotonic()
        task, now_idle = slot.take_one(task_id, now)
        if now_idle:
            self._now_idle(slot, now, dispatch)
        if task is None:
            return  # no longer this worker's task
        self.counts.run_time.record(now - task.started_at)
        ok, value = o.rebuild_value(name, blob)
        if ok:
            self._finish(task, value)
        else:
            self._finish(task, exc=value)

    def _on_lent_results(self, slot: WorkerSlot, outcomes: list[tuple[int, o.Outcome]]
                         ) -> None:
        """A lent pipe's answer, read by its caller: ``_on_results`` without the dispatching,
        which is left to the dispatcher thread (``reclaim`` wakes it if tasks wait)."""
        self._on_results(slot, outcomes, dispatch=False)

    def wait_lent(self, lent: Lent) -> None:
        """Block the calling thread until the lent pipe has the answer (or the worker died, or
        the task was settled otherwise: timed out, shutdown), then ``reclaim`` the pipe. The
        task is done afterwards, or soon is: wait on it."""
        task, slot, fd = lent.task, lent.slot, lent.fd
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        waiter.register(lent.sentinel, select.POLLIN)
        deadline = task.deadline
        readable = False
        try:
            while slot.lent is task and not task.done():
                wait = _LENT_CHECK
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break  # the dispatcher times the task out
                events = waiter.poll(wait * 1000.0)
                if events:  # the pipe, the process's end, or both
                    readable = len(events) == 2 or events[0][0] == fd
                    break
        except BaseException:  # Ctrl-C: the dispatcher reads the answer when it comes
            self.reclaim(lent, False)
            raise
        self.reclaim(lent, True, readable)

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

    def has_live_worker(self) -> bool:
        if self.idle:
            return True
        for slot in self.slots:  # a loop, not any(): on every submit, usually done at once
            if slot.state in LIVE_STATES:
                return True
        return False

    def snapshot(self) -> PoolStats:
        """Workers, queue and counters at about this moment (no lock; cheap)."""
        workers = tuple(slot.stats() for slot in list(self.slots))
        # Cancelled tasks leave the queue at once for callers, even before the dispatcher
        # has drained the news.
        waiting = self.pending.snapshot() + [t for t in list(self.inbox) if isinstance(t, Task)]
        queued = sum(not t.cancelled() for t in waiting)
        return self.counts.snapshot(workers, queued)

    # ---- the dispatcher thread --------------------------------------------------------------

    def _run(self) -> None:
        mark_dispatcher_thread()
        try:
            self._loop()
        except BaseException:
            logger.exception("stateful_pool dispatcher failed; failing every task and stopping")
            self._fail_all(lambda: PoolClosedError("the pool's dispatcher failed; see the log"))
        finally:
            with self._sched, self._lock:
                self.accepting = False  # from now on no caller sends to a worker either
                self._undrive()
                for slot in self.slots:
                    slot.lent = None  # the pipes are the dispatcher's again, to close
            self._stop_workers()
            self._refuse_inbox()
            self.poller.stop_waking()

    def _loop(self) -> None:
        sched = self._sched
        sched.acquire()
        try:
            while True:
                timeout = self._step()
                if timeout is _DONE:
                    return
                timeout = self._sleep_cap(timeout)
                sched.release()
                try:
                    ready = self.poller.poll(timeout)
                finally:
                    sched.acquire()
                self._handle(ready)
        finally:
            sched.release()

    def _step(self) -> Any:
        """One round of scheduling; returns the poll timeout (seconds or None) or _DONE."""
        self._drain_inbox()
        now = time.monotonic()
        if self.driver is not None:
            self._watch_driver(now)
        if len(self.deadlines) > PRUNE_AT:
            self.deadlines.prune(len(self.pending) + sum(len(s.tasks) for s in self.slots))
        self._expire_tasks(now)
        if self.hang_timeout is not None or self._timers_armed:
            self._check_worker_timers(now)
        if self.pending or self.closing:
            self._take_back_all()
        self._dispatch(now)
        if self.closing and self._drained(now):
            return _DONE
        return self._next_timer(now)

    def _handle(self, ready: list[int]) -> None:
        poller = self.poller
        if poller.pipes_fd in ready:  # one or more pipes; read here unless a loop drives
            ready = [fd for fd in ready if fd != poller.pipes_fd]
            if self.driver is None:
                ready += poller.ready_pipes()
        for fd in ready:
            owner = self.poller.owner(fd)
            if owner is None:
                continue  # unregistered by an earlier event of this round
            slot, is_pipe = owner
            if is_pipe:
                if slot.lent is None:  # else its caller reads it (a hang-up is told once)
                    self._on_readable(slot)
            else:
                self._on_exit(slot)

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            item = inbox.popleft()
            if (type(item) is LoopTask or type(item) is ThreadTask or type(item) is Task
                    or type(item) is Stream):
                self._accept(item)
            elif isinstance(item, StartWorker):
                self._start_process(item.slot)
            elif isinstance(item, Cancelled):
                if self.pending.remove(item.task.id) is not None:
                    self.counts.cancelled += 1
            elif isinstance(item, Credit):
                self._on_credit(item.stream, item.chunks)
            elif isinstance(item, StopStream):
                self._on_stop_stream(item.stream)
            elif isinstance(item, Reclaim):
                self._take_back(item.slot, item.task)
            elif isinstance(item, Close):
                self._on_close(item)

    def _take_back(self, slot: WorkerSlot, task: Task | None) -> None:
        """A lent pipe is the dispatcher's again: its caller asked (``task``), or the
        dispatcher needs it (``None``)."""
        if slot.lent is not None and (task is None or slot.lent is task):
            slot.lent = None
            self._arm(slot)

    def _take_back_all(self) -> None:
        """Read every lent pipe here from now on: tasks queue, or the pool is closing, and
        a worker's answer must not wait for its caller to get round to it (an event loop
        blocked in ``shutdown()``, or in anything else, would hold the worker meanwhile)."""
        for slot in self.slots:
            if slot.lent is not None:
                self._take_back(slot, None)
            elif slot.paused and self.closing:
                self._arm(slot)

    def _accept(self, task: Task) -> None:
        self.counts.submitted += 1
        if not self.idle and not self.has_live_worker():
            self._finish(task, exc=NoWorkersError("the pool has no live worker"))
            return
        self.pending.push(task.id, task, time.monotonic())
        if task.deadline is not None:
            self.deadlines.push(task)

    def _dispatch(self, now: float) -> None:
        pending, idle = self.pending, self.idle
        while pending and idle:
            batch = pending.next_batch(now)
            if not batch:
                return
            started = [task for task in batch if self._start(task)]
            if started:
                # The worker idle the shortest time: its process is the likeliest to be on a
                # core and in cache still (measurably shorter round trips than round-robin).
                self._send(idle.pop(), started, now)
        if self.streams_per_worker > 1 and pending:
            self._join_running(now)
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
                if (slot.state != W.BUSY or slot.messages != depth or slot.kill_reason
                        or slot.lent is not None):
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
        self.counts.cancelled += 1
        return False

    def _send(self, slot: WorkerSlot, tasks: list[Task], now: float) -> None:
        if slot.paused:
            self._arm(slot)
        record_wait = self.counts.queue_wait.record
        for task in tasks:
            record_wait(now - task.submitted_at)
        if self.batching:
            self.counts.batches.record(len(tasks))
            if len(tasks) > 1 and any(t.is_stream for t in tasks):
                # A stream goes in a message of its own; the worker runs it after the batch.
                plain = [t for t in tasks if not t.is_stream]
                if plain:
                    slot.send_tasks(plain, True, now)
                for task in tasks:
                    if task.is_stream:
                        slot.send_tasks([task], False, now)
                return
        slot.send_tasks(tasks, self.batching, now)

    def _on_readable(self, slot: WorkerSlot) -> None:
        conn = slot.conn
        assert conn is not None
        try:
            frame = slot.recv_frame()
            if frame[0] == m.RESULT1:  # one task's result: the usual message
                self._on_result1(slot, frame)
                return
            message = m.recv_message(conn.recv_bytes, frame)
        except (EOFError, OSError):
            self._on_exit(slot)
        else:
            self._on_message(slot, message)

    def _on_results(self, slot: WorkerSlot, outcomes: list[tuple[int, o.Outcome]], *,
                    dispatch: bool = True) -> None:
        now = time.monotonic()
        done, now_idle = slot.take_results(outcomes, now)
        record = self.counts.run_time.record
        for task, _ in done:
            record(now - task.started_at)
        if now_idle:
            self._now_idle(slot, now, dispatch)
        for task, outcome in done:
            ok, value = o.rebuild_outcome(outcome)
            if ok:
                self._finish(task, value)
            else:
                self._finish(task, exc=value)

    def _now_idle(self, slot: WorkerSlot, now: float, dispatch: bool) -> None:
        """The worker answered its last task: it may take the next one (not if it is being
        killed). With ``dispatch``, that task goes out before the callers are woken:
        resolving futures runs their callbacks, and the worker would idle meanwhile."""
        if slot.kill_reason:
            return
        self.idle.append(slot)
        if dispatch and self.pending and not slot.reaping:
            self._expire_tasks(now)  # never send what has expired
            self._dispatch(now)

    def _on_message(self, slot: WorkerSlot, message: m.Message) -> None:
        kind = message.kind
        if kind == m.Kind.RESULTS:
            self._on_results(slot, o.outcomes_of(message))
        elif kind == m.Kind.CHUNKS:
            self._on_chunks(slot, message)
        elif kind == m.Kind.SPAWNED:
            self._on_spawned(slot, o.outcomes_of(message)[0][1])

    def _expire_tasks(self, now: float) -> None:
        soonest = self.deadlines.next_at()
        if soonest is None or soonest > now:
            return
        for task in self.deadlines.due(now):
            if task.state == T.DONE:
                continue
            if task.is_stream:
                self._expire_stream(task, now)  # type: ignore[arg-type]
                continue
            if task.state == T.QUEUED:
                self.pending.remove(task.id)
                if task.holds_slot:
                    self.release_slot(task)
                where = "before it started; it will not run"
            else:
                where = "while running; its result will be discarded"
            self.counts.timed_out += 1
            task.state = T.DONE
            task.forget_pool()
            settle(task, exc=TaskTimeoutError(f"task timed out {where}"))

    def _next_timer(self, now: float) -> float | None:
        times: list[float] = []
        if (soonest := self.deadlines.next_at()) is not None:
            times.append(soonest)
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
        task.forget_pool()
        # Counted before the caller can wake and read stats(); a task that timed out or was
        # cancelled earlier keeps that outcome, and this one is dropped.
        counts = self.counts
        if exc is None:
            counts.completed += 1
            if not settle(task, result):
                counts.completed -= 1
        else:
            counts.failed += 1
            if not settle(task, exc=exc):
                counts.failed -= 1
                if task.cancelled():
                    # Taken off the queue (no worker left, shutdown) before the news of its
                    # cancel was drained: that news will find nothing to count.
                    counts.cancelled += 1

