"""One worker of the pool as the dispatcher sees it, and the thread that writes large
messages to it."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from . import _messages as m
from ._restart import RestartPolicy
from ._states import WorkerState, check_transition
from ._stats import TimeRecorder
from ._task import Task


class WorkerSlot:
    """One worker; survives respawns (same id, same spawn arguments, same restart budget).

    Only the dispatcher thread changes it, except ``state``'s first value.
    """

    def __init__(self, worker_id: int, spawn_payload: bytes, future: Future[Any],
                 options: dict[str, Any], restarts: RestartPolicy) -> None:
        # What it is: fixed for its life.
        self.id = worker_id
        self.spawn_payload = spawn_payload
        self.options = options
        self.restarts = restarts
        # Its current process (replaced on respawn).
        self.process: Any = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.location: dict[str, Any] = {}
        self.writer: FrameWriter | None = None
        self.last_exitcode: int | None = None
        # Its lifecycle.
        self._state = WorkerState.STARTING
        self.spawn_future: Future[Any] | None = future  # the first spawn's caller
        self.spawn_deadline: float | None = None
        self.spawn_error: BaseException | None = None
        self.kill_reason = ""  # why the pool killed it: spawn_timeout, hang_timeout...
        self.restart_at = 0.0
        self.reaping = False
        # Its work.
        self.tasks: dict[int, Task] = {}
        self.messages = 0  # EXEC/BATCH messages sent and not answered yet
        self.busy_since = 0.0
        self.tasks_done = 0
        self.run_time = TimeRecorder()

    @property
    def state(self) -> WorkerState:
        return self._state

    @state.setter
    def state(self, new: WorkerState) -> None:
        check_transition(self._state, new)
        self._state = new

    def holds_wanted_task(self) -> bool:
        """Whether a caller still waits for one of the tasks it holds."""
        return any(task.wanted for task in self.tasks.values())


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
