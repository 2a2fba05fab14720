"""The dispatcher's shutdown: when the pool may stop, and stopping every worker.

``WorkerShutdown`` extends ``_lifecycle.WorkerLifecycle`` and is the base of
``_dispatch.Dispatcher``; it runs only on the dispatcher thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from . import _messages as m
from ._inbox import Close, Message, StartWorker
from ._lifecycle import WorkerLifecycle
from ._slot import WorkerSlot
from ._states import LIVE_STATES, TaskState, WorkerState
from ._task import Task, settle
from .errors import PoolClosedError

logger = logging.getLogger("stateful_pool")

W = WorkerState

# After shutdown asks an idle worker to stop, how long it may take before it is killed. It
# runs its close() hook and leaves with os._exit (no interpreter teardown), so milliseconds
# is the norm; a slow close() gets this long.
STOP_GRACE = 10.0


class WorkerShutdown(WorkerLifecycle):
    # Provided by the Dispatcher.
    inbox: deque[Message]
    kill_on_close: bool
    cancel_on_close: bool
    close_deadline: float | None

    def _on_close(self, close: Close) -> None:
        self.closing = True
        self.cancel_on_close = self.cancel_on_close or close.cancel_futures
        if close.timeout is not None:
            deadline = time.monotonic() + close.timeout
            if self.close_deadline is None or deadline < self.close_deadline:
                self.close_deadline = deadline
        if self.cancel_on_close:
            for task in self.pending.pop_all():
                task.cancel()  # or its caller did, and the news waits in the inbox
                self.counts.cancelled += 1
                task.state = TaskState.DONE

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
            if isinstance(item, Task):
                self.counts.submitted += 1
                self._finish(item, exc=PoolClosedError("the pool is shut down"))
            elif isinstance(item, StartWorker) and item.slot.spawn_future is not None:
                settle(item.slot.spawn_future, exc=PoolClosedError("the pool is shut down"))

    def _stop_workers(self) -> None:
        """Ask every worker to stop, kill the ones that do not, and fail whatever is left."""
        for task in self.pending.pop_all():  # the close deadline passed before they ran
            task.cancel()  # or its caller did, and the news waits in the inbox
            self.counts.cancelled += 1
        now = time.monotonic()
        deadlines: dict[int, float] = {}
        for slot in self.slots:
            if slot.conn is not None:
                deadlines[slot.id] = now + self._stop_one(slot)
            if slot.state in LIVE_STATES:
                slot.state = W.STOPPING
        for slot in self.slots:
            if slot.process is None or slot.conn is None:
                slot.state = W.STOPPED if slot.state != W.DEAD else W.DEAD
                continue
            self._join_unless_killed(slot, deadlines[slot.id])
            if slot.process.exitcode is None:
                if not self.kill_on_close and deadlines[slot.id] > now:  # asked, not killed
                    logger.warning("worker %d did not stop within %.0f s; killing it",
                                   slot.id, deadlines[slot.id] - now)
                slot.process.kill()
                slot.process.join()
            self._release_stopped(slot)
        self.idle.clear()
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.close()

    def _stop_one(self, slot: WorkerSlot) -> float:
        """Tell one worker to stop; return how long it may take before it is killed."""
        # A second Ctrl-C, still working past the drain deadline, or busy with tasks nobody
        # waits for: no need to be gentle (a worker ignores SIGTERM, so it is SIGKILL).
        if (self.kill_on_close or slot.state == W.STARTING or slot.state == W.BUSY
                or slot.holds_wanted_task()):
            slot.process.kill()
            return 0.0
        try:
            m.send_message(slot.conn.send_bytes, m.Kind.STOP, [])  # type: ignore[union-attr]
        except OSError:
            pass
        return STOP_GRACE

    def _join_unless_killed(self, slot: WorkerSlot, deadline: float) -> None:
        """Wait for a worker to exit until ``deadline``, or until a kill is requested."""
        while not self.kill_on_close:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            slot.process.join(min(left, 0.05))
            if slot.process.exitcode is not None:
                return

    def _release_stopped(self, slot: WorkerSlot) -> None:
        """Fail what a stopped worker still held and close its connection."""
        for task in slot.tasks.values():
            self._finish(task, exc=PoolClosedError("the pool shut down before this task finished"))
        slot.tasks.clear()
        if slot.spawn_future is not None:  # killed mid-spawn at the shutdown deadline
            settle(slot.spawn_future, exc=PoolClosedError(
                "the pool shut down before this worker finished spawning"))
            slot.spawn_future = None
        self._unwatch(slot)
        self._wait_writer(slot)
        assert slot.conn is not None
        slot.conn.close()
        slot.conn = None
        slot.state = W.STOPPED if slot.state != W.DEAD else W.DEAD

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        for task in self.pending.pop_all():
            self._finish(task, exc=make_error())
        for slot in self.slots:
            for task in slot.tasks.values():
                self._finish(task, exc=make_error())
            slot.tasks.clear()
            if slot.spawn_future is not None:
                settle(slot.spawn_future, exc=make_error())
