"""The dispatcher's half that deals with worker processes: start, watch, reap, restart.

``WorkerLifecycle`` is the base class of ``_shutdown.WorkerShutdown`` (which stops the
workers), itself the base of ``_dispatch.Dispatcher``; all of it runs on the dispatcher
thread only. The restart budget is ``_restart.RestartPolicy``; the legal state changes are
in ``_states.py``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from . import _messages as m
from . import _outcomes as o
from ._batching import PendingQueue
from ._poll import Poller
from ._slot import WorkerSlot
from ._states import WorkerState
from ._stats import Counters
from ._task import Task, settle
from ._transport import Transport
from .errors import (
    NoWorkersError,
    SpawnError,
    SpawnTimeoutError,
    WorkerCrashedError,
    describe_exit,
)

logger = logging.getLogger("stateful_pool")

W = WorkerState

class WorkerLifecycle:
    # Provided by the Dispatcher.
    worker_cls: type
    transport: Transport
    spawn_timeout: float | None
    hang_timeout: float | None
    slots: list[WorkerSlot]
    idle: deque[WorkerSlot]
    pending: PendingQueue[Task]
    counts: Counters
    closing: bool
    _timers_armed: bool
    poller: Poller[tuple[WorkerSlot, bool]]

    def _on_message(self, slot: WorkerSlot, message: m.Message) -> None:
        raise NotImplementedError

    def _finish(self, task: Task, result: Any = None, exc: BaseException | None = None) -> None:
        raise NotImplementedError

    def has_live_worker(self) -> bool:
        raise NotImplementedError

    # ---- start and watch ----------------------------------------------------------------

    def _start_process(self, slot: WorkerSlot) -> None:
        slot.state = W.STARTING
        slot.kill_reason = ""
        try:
            parent_conn, process = self.transport.start(self.worker_cls, slot.id, slot.options)
        except Exception as exc:
            logger.exception("could not start worker %d", slot.id)
            self._lose_worker(slot, SpawnError(f"could not start worker {slot.id}: {exc!r}"))
            return
        slot.process, slot.conn, slot.pid = process, parent_conn, process.pid
        slot.send_frame = m.frame_sender(parent_conn)
        slot.recv_frame = m.frame_receiver(parent_conn)
        self._watch(slot)
        if self.spawn_timeout is not None:
            slot.spawn_deadline = time.monotonic() + self.spawn_timeout
            self._timers_armed = True
        slot.send_spawn()

    def _watch(self, slot: WorkerSlot) -> None:
        assert slot.conn is not None
        slot.paused = False
        for fd, is_pipe in ((slot.conn.fileno(), True), (slot.process.sentinel, False)):
            self.poller.watch(fd, (slot, is_pipe), pipe=is_pipe)

    def _unwatch(self, slot: WorkerSlot) -> None:
        assert slot.conn is not None
        for fd in (slot.conn.fileno(), slot.process.sentinel):
            self.poller.unwatch(fd)

    @staticmethod
    def _wait_writer(slot: WorkerSlot) -> None:
        """Let an in-flight large send fail on the dead worker before its fd is closed (a
        closed fd number is soon reused)."""
        if slot.writer is not None and not slot.writer.idle.wait(5.0):
            logger.error("writer of worker %d still blocked after its death", slot.id)

    def _on_spawned(self, slot: WorkerSlot, outcome: o.Outcome) -> None:
        ok, value = o.rebuild_outcome(outcome)
        slot.spawn_deadline = None
        future, slot.spawn_future = slot.spawn_future, None
        if ok:
            slot.state = W.IDLE
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

    # ---- death and restart --------------------------------------------------------------

    def _reap(self, slot: WorkerSlot) -> int | None:
        """Read what the dead worker sent last, wait for its process, release its fds."""
        conn = slot.conn
        assert conn is not None
        slot.lent = None  # its caller stops reading: the pipe is read here, then closed
        slot.reaping = True
        try:  # results the worker sent just before dying still count
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
        slot.last_exitcode = slot.process.exitcode
        self._unwatch(slot)
        self._wait_writer(slot)
        conn.close()
        slot.conn = None
        if slot in self.idle:
            self.idle.remove(slot)
        return slot.last_exitcode

    def _on_exit(self, slot: WorkerSlot) -> None:
        """The worker's process ended (or its pipe broke): reap it and fail what it held."""
        exitcode = self._reap(slot)
        how = getattr(slot.process, "death_cause", None) or describe_exit(exitcode)
        if slot.state == W.STOPPING:
            slot.state = W.STOPPED
        elif slot.state == W.STARTING:
            self._on_spawn_death(slot, how)
        else:
            self._on_crash(slot, exitcode, how)

    def _on_spawn_death(self, slot: WorkerSlot, how: str) -> None:
        pid, reason = slot.pid, slot.kill_reason
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
        slot.last_failure = f"spawn failed: {error!r}"
        future, slot.spawn_future = slot.spawn_future, None
        if future is not None:  # a first spawn: the caller learns, no respawn
            if error is not None:
                settle(future, exc=error)
            self._lose_worker(slot, None, forget=True)
        else:  # a respawn that failed: try again under the budget
            self._schedule_restart(slot)

    def _on_crash(self, slot: WorkerSlot, exitcode: int | None, how: str) -> None:
        pid, reason = slot.pid, slot.kill_reason
        if reason == "hang_timeout":
            why = f"it was killed after running a task for more than {self.hang_timeout} s"
        else:
            why = f"it died with {how}"
        slot.last_failure = why.removeprefix("it ")
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
                worker_id=slot.id, pid=pid, exitcode=exitcode, reason=reason or "crashed"))
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        if self.closing and not self.pending:
            slot.state = W.STOPPED
            return
        now = time.monotonic()
        policy = slot.restarts
        spent = policy.budget_spent(now)
        delay = policy.delay(now)
        if delay is None:
            logger.error("worker %d gave up: %d restarts within %.0f s (max_restarts=%s)",
                         slot.id, policy.recent(now), policy.window, policy.max_restarts)
            self._lose_worker(slot, None)
            return
        if spent:
            logger.error("worker %d backs off for %.0f s: %d restarts within %.0f s "
                         "(max_restarts=%s); last failure: %s", slot.id, delay,
                         policy.recent(now), policy.window, policy.max_restarts,
                         slot.last_failure)
        slot.state = W.BACKING_OFF if spent else W.RESTARTING
        slot.restart_at = now + delay
        self._timers_armed = True

    def _lose_worker(self, slot: WorkerSlot, error: BaseException | None,
                     forget: bool = False) -> None:
        """Take a worker out of service for good; fail queued tasks if it was the last one."""
        slot.state = W.DEAD
        if error is not None and slot.spawn_future is not None:
            settle(slot.spawn_future, exc=error)
            slot.spawn_future = None
        if forget and slot in self.slots:
            self.slots.remove(slot)
            if slot.writer is not None:  # it sent the spawn arguments; shutdown will not see it
                slot.writer.close()
                slot.writer = None
        if not self.has_live_worker():
            for task in self.pending.pop_all():
                self._finish(task, exc=NoWorkersError(
                    "the pool has no live worker left (spawn failed or restart budget spent)"))

    def _check_worker_timers(self, now: float) -> None:
        """Respawn workers whose backoff is over; kill spawns and tasks past their limit."""
        armed = False
        for slot in self.slots:
            state = slot.state
            waiting = state == W.RESTARTING or state == W.BACKING_OFF
            if waiting or (state == W.STARTING and slot.spawn_deadline is not None):
                armed = True
            if waiting and slot.restart_at <= now:
                slot.restarts.record(now)
                self.counts.restarts += 1
                logger.info("respawning worker %d (restart %d)", slot.id, slot.restarts.total)
                self._start_process(slot)
            elif (state == W.STARTING and slot.spawn_deadline is not None
                  and slot.spawn_deadline <= now and slot.kill_reason == ""):
                slot.kill_reason = "spawn_timeout"
                slot.process.kill()
            elif (state == W.BUSY and self.hang_timeout is not None
                  and slot.busy_since + self.hang_timeout <= now and slot.kill_reason == ""):
                if slot.waits_for_reader():  # a stream paused for a slow reader: healthy
                    slot.busy_since = now
                    continue
                slot.kill_reason = "hang_timeout"
                slot.process.kill()
        self._timers_armed = armed

    def _worker_timer_times(self) -> list[float]:
        times = []
        for slot in self.slots:
            if slot.state == W.RESTARTING or slot.state == W.BACKING_OFF:
                times.append(slot.restart_at)
            elif slot.state == W.STARTING and slot.spawn_deadline is not None:
                times.append(slot.spawn_deadline)
            elif slot.state == W.BUSY and self.hang_timeout is not None:
                times.append(slot.busy_since + self.hang_timeout)
        return times

