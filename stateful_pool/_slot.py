"""One worker of the pool as the dispatcher sees it, and the thread that writes large
messages to it."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from . import _messages as m
from ._outcomes import Outcome
from ._restart import RestartPolicy
from ._states import WorkerState, check_transition
from ._stats import TimeRecorder, WorkerStats
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
        # Its pipe's send_bytes and recv_bytes, the fast ones (_messages.frame_sender).
        self.send_frame: Any = None
        self.recv_frame: Any = None
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
        self.restart_at = 0.0  # monotonic time of the next respawn (restarting, backing off)
        self.last_failure: str | None = None  # why its previous process ended, if it failed
        self.reaping = False
        # The task whose caller reads this worker's pipe itself (see Dispatcher.try_lend);
        # the dispatcher leaves the pipe alone meanwhile. Changed under the dispatcher's
        # scheduling lock only.
        self.lent: Task | None = None
        # Its pipe is paused in the dispatcher's poller (``Poller.pause``): lent now, or left
        # paused after a lent answer while the worker idles, so that the next caller to lend
        # it needs no system call. Whoever sends it a task whose answer is the dispatcher's
        # resumes it first (``Dispatcher._arm``). Changed under the scheduling lock only.
        self.paused = False
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

    def waits_for_reader(self) -> bool:
        """Every task it holds is a stream paused until its reader consumes: not hung."""
        tasks = self.tasks.values()
        return bool(tasks) and all(task.paused for task in tasks)

    def holds_wanted_task(self) -> bool:
        """Whether a caller still waits for one of the tasks it holds."""
        return any(task.wanted for task in self.tasks.values())

    def send_spawn(self) -> None:
        """Send the SPAWN message to its new process."""
        # A large one goes through the writer: the process reads it only after re-importing
        # the user's __main__ (seconds with torch), and written from the dispatcher thread,
        # arguments larger than the pipe's buffer would stall every other worker and
        # spawn_timeout meanwhile.
        self.send(m.Kind.SPAWN, [], blobs=[self.spawn_payload])

    def send_tasks(self, tasks: list[Task], batch: bool, now: float) -> None:
        """Hand tasks to this worker in one message: EXEC (one task) or BATCH
        (``execute_batch``). It is busy from now on, if it was not already."""
        first: Any = tasks[0]
        if len(tasks) == 1 and first.context is None and not first.is_stream and not batch:
            payload = first.payload
            if (type(payload) is bytes and len(payload) <= m.INLINE_MAX
                    and (self.writer is None or self.writer.idle.is_set())):
                self.send_one(first, payload, now)
                return
        for task in tasks:
            self.tasks[task.id] = task
            task.started_at = now
        if self._state != WorkerState.BUSY:
            self.state = WorkerState.BUSY
            self.busy_since = now
        self.messages += 1
        payloads = [t.payload for t in tasks]
        for task in tasks:
            task.payload = b""  # the worker gets it now; free the memory with the message
        contexts = None
        for task in tasks:
            if task.context is not None:
                contexts = [t.context for t in tasks]
                break
        if first.is_stream:  # always alone in its message
            first.slot = self
            self.send(m.Kind.STREAM, [first.id], [first.window], contexts, payloads)
            return
        self.send(m.Kind.BATCH if batch else m.Kind.EXEC, [t.id for t in tasks], None,
                  contexts, payloads)

    def send_one(self, task: Task, payload: bytes, now: float) -> None:
        """The usual task: one, with an inline payload, no context, not a stream, and no
        large message queued before it (``send_tasks`` checked), in one compact frame
        straight to the pipe."""
        self.tasks[task.id] = task
        task.started_at = now
        task.payload = b""
        if self._state is WorkerState.IDLE:
            self._state = WorkerState.BUSY  # (a legal move, not checked on this path)
            self.busy_since = now
        elif self._state is not WorkerState.BUSY:
            self.state = WorkerState.BUSY  # (checked: raises if not a legal move)
            self.busy_since = now
        self.messages += 1
        try:
            self.send_frame(m.exec1(task.id, payload))
        except OSError:
            pass  # the worker died; its sentinel fires next and fails its tasks

    def send(self, kind: m.Kind, ids: list[int], metas: list[Any] | None = None,
             contexts: list[dict[str, Any] | None] | None = None,
             blobs: list[m.Payload] | None = None) -> None:
        """Send one message to this worker (a dead worker's sentinel tells; not this)."""
        assert self.conn is not None
        # Messages to one worker must not interleave: once one goes through the writer, the
        # ones queued behind it (prefetch) follow the same path.
        if (self.writer is not None and not self.writer.idle.is_set()) or m.has_large(blobs):
            # A large message takes the pipe's speed to cross (0.5 ms per MiB here): written
            # from the dispatcher thread, it would hold every other worker's dispatch up.
            if self.writer is None:
                self.writer = FrameWriter(f"stateful_pool-writer-{self.id}")
            self.writer.send(self.conn, m.encode(kind, ids, metas, contexts, blobs))
            return
        try:
            m.send_message(self.conn.send_bytes, kind, ids, metas, contexts, blobs)
        except OSError:
            pass  # the worker died; its sentinel fires next and fails its tasks

    def take_results(self, outcomes: list[tuple[int, Outcome]], now: float
                     ) -> tuple[list[tuple[Task, Outcome]], bool]:
        """Take the tasks a RESULTS message answers off this worker; return them with their
        outcomes, and whether the worker is idle now."""
        tasks = self.tasks
        done = [(task, outcome) for task_id, outcome in outcomes
                if (task := tasks.pop(task_id, None)) is not None]
        for task, _ in done:
            self.run_time.record(now - task.started_at)
        return done, self._answered(len(outcomes), now)

    def take_one(self, task_id: int, now: float) -> tuple[Task | None, bool]:
        """``take_results`` for a message that answers one task."""
        task = self.tasks.pop(task_id, None)
        if task is not None:
            self.run_time.record(now - task.started_at)
        return task, self._answered(1, now)

    def _answered(self, count: int, now: float) -> bool:
        """One message answering ``count`` tasks came back; whether the worker idles now."""
        self.tasks_done += count
        self.messages -= 1
        if not self.tasks and self._state is WorkerState.BUSY:
            self._state = WorkerState.IDLE  # (a legal move, not checked on this path)
            self.messages = 0
            return True
        if self.messages:
            self.busy_since = now  # its next (prefetched) message starts now
        return False

    def stats(self) -> WorkerStats:
        """This worker at about this moment (read from any thread; no lock)."""
        where = self.location
        state = self.state
        restart_in = None
        if state == WorkerState.RESTARTING or state == WorkerState.BACKING_OFF:
            restart_in = max(0.0, self.restart_at - time.monotonic())
        return WorkerStats(worker_id=self.id, pid=self.pid, state=state,
                           tasks_done=self.tasks_done, restarts=self.restarts.total,
                           running=len(self.tasks), last_exitcode=self.last_exitcode,
                           host=where.get("host"), node=where.get("node"),
                           gpu_ids=tuple(where.get("gpu_ids", ())),
                           run_time=self.run_time.snapshot(), restart_in=restart_in,
                           last_failure=self.last_failure)


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

    def send(self, conn: Connection, frames: list[Any]) -> None:
        with self._lock:
            self._queued += 1
            self.idle.clear()
        self._jobs.put((conn, frames))

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, frames = job
            try:
                for frame in frames:
                    conn.send_bytes(frame)
            except (OSError, TypeError):
                pass  # the worker died (its sentinel tells the dispatcher) or conn was closed
            finally:
                del job, frames
                with self._lock:
                    self._queued -= 1
                    if not self._queued:
                        self.idle.set()
