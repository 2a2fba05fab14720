"""The errors a pool raises, in one small tree.

Every error here derives from :class:`PoolError`. Exceptions raised by *your* code inside a
worker (in ``spawn``, ``execute`` or ``execute_batch``) are not wrapped: the caller gets the
same exception type back, with the worker's formatted traceback attached as ``__cause__``.
Only when such an exception cannot be pickled in the worker or rebuilt in the parent does the
caller get a :class:`RemoteError` instead.

::

    PoolError
    ├── PoolClosedError        (also RuntimeError)  submit after shutdown()
    ├── NoWorkersError         (also RuntimeError)  no worker is alive or starting
    ├── QueueFullError         (also queue.Full)    queue_size reached past submission_timeout
    ├── TaskTimeoutError       (also TimeoutError)  execution_timeout passed
    ├── WorkerCrashedError                          the worker holding the task died
    ├── SpawnError                                  the worker process died during spawn
    │   └── SpawnTimeoutError  (also TimeoutError)  spawn_timeout passed
    └── RemoteError                                 a remote exception or result could not
                                                    cross the process boundary
"""

from __future__ import annotations

import queue
import signal

__all__ = [
    "NoWorkersError",
    "PoolClosedError",
    "PoolError",
    "QueueFullError",
    "RemoteError",
    "SpawnError",
    "SpawnTimeoutError",
    "TaskTimeoutError",
    "WorkerCrashedError",
]


class PoolError(Exception):
    """Base class of every error raised by the pool itself."""


class PoolClosedError(PoolError, RuntimeError):
    """A task or spawn was submitted after :meth:`SPool.shutdown` was called.

    Raised at submission only. Tasks dropped by ``shutdown(cancel_futures=True)`` are
    cancelled instead (``future.cancelled()`` is true).
    """


class NoWorkersError(PoolError, RuntimeError):
    """The pool has no worker that is alive, starting or restarting.

    Raised at once by ``execute``/``submit_execute`` when nothing was spawned (or every worker
    has exhausted its restart budget), and set on queued tasks when the last worker is lost.
    Subclasses ``RuntimeError`` because stateful-pool 0.3.2 raised a plain ``RuntimeError``.
    """


class QueueFullError(PoolError, queue.Full):
    """``queue_size`` tasks were already waiting and none left within ``submission_timeout``.

    The task was not accepted; nothing was run. Subclasses ``queue.Full`` because
    stateful-pool 0.3.2 let that error escape from its internal queue. An HTTP server should
    answer 503 with ``Retry-After``.
    """


class TaskTimeoutError(PoolError, TimeoutError):
    """The task did not finish within ``execution_timeout`` seconds of its submission.

    If the task had not started yet, it was removed from the queue and never runs. If it was
    running, the worker finishes it and its result is discarded (use ``hang_timeout`` to kill
    workers whose tasks never finish).
    """


class WorkerCrashedError(PoolError):
    """The worker process that held this task died before answering.

    Only the tasks held by that worker fail with this error; they are never retried. The
    worker is respawned with its original spawn arguments while its restart budget lasts.

    Attributes:
        worker_id: index of the worker in the pool (stable across respawns).
        pid: process id of the dead process.
        exitcode: its exit code; negative ``-N`` when killed by signal ``N``.
        reason: a short human explanation (for example "exceeded hang_timeout").
    """

    def __init__(
        self, message: str, *, worker_id: int, pid: int | None, exitcode: int | None, reason: str
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self.reason = reason

    @property
    def how(self) -> str:
        """How the process ended, in words: "exit code 3", "signal SIGKILL"..."""
        return describe_exit(self.exitcode)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (str(self), self.worker_id, self.pid, self.exitcode, self.reason))


def describe_exit(exitcode: int | None) -> str:
    """A process exit code in words (negative: killed by that signal)."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _rebuild_crash(
    message: str, worker_id: int, pid: int | None, exitcode: int | None, reason: str
) -> WorkerCrashedError:
    return WorkerCrashedError(
        message, worker_id=worker_id, pid=pid, exitcode=exitcode, reason=reason
    )


class SpawnError(PoolError):
    """The worker process died, or could not be started, before its ``spawn`` returned.

    When ``spawn`` *raises*, the caller gets that exception itself, not this one. No process
    is left behind in either case.
    """


class SpawnTimeoutError(SpawnError, TimeoutError):
    """``spawn`` did not return within ``spawn_timeout``; the process was killed."""


class RemoteError(PoolError):
    """An exception or result could not be sent from the worker or rebuilt in the parent.

    Carries what could be salvaged as plain text, so the cause stays visible.

    Attributes:
        type_name: qualified name of the original exception or result type.
        remote_message: ``str()`` of the original exception (or the pickling error).
        remote_traceback: the worker's formatted traceback, or ``""``.
    """

    def __init__(self, message: str, *, type_name: str, remote_message: str,
                 remote_traceback: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


for _cls in (PoolError, PoolClosedError, NoWorkersError, QueueFullError, TaskTimeoutError,
             WorkerCrashedError, SpawnError, SpawnTimeoutError, RemoteError):
    _cls.__module__ = "stateful_pool"
del _cls
