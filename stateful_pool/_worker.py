"""The worker: the user's ``SWorker`` subclass and the loop that runs it in its own process.

Everything below ``SWorker`` runs in the worker process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Generic, NoReturn, TypeVar

from . import _messages as m
from ._classref import ClassRef, load_class

SpawnR = TypeVar("SpawnR")
ExecR = TypeVar("ExecR")

# How often a worker checks that its parent is still alive. A worker whose parent was
# SIGKILLed must exit on its own (it may hold GPU memory); 0.2 s keeps that well under a second
# at a negligible cost (one getppid() call per tick).
_PARENT_CHECK_INTERVAL = 0.2


class SWorker(Generic[SpawnR, ExecR]):
    """Base class of a stateful worker. One instance lives in each worker process.

    Subclass it and override:

    * ``spawn(self, *args, **kwargs)``: runs once when the process starts (load a model,
      open a device). Its return value is what ``pool.spawn(...)`` returns. If it raises,
      ``pool.spawn`` raises the same exception and the process is gone.
    * ``execute(self, *args, **kwargs)``: runs once per task, with the arguments given to
      ``pool.execute(...)``; its return value is the task's result.
    * optionally ``execute_batch(self, batch: list) -> list``: with ``SPool(...,
      max_batch_size=N)``, receives the single positional argument of up to ``N`` queued
      tasks and returns one result per item, in order. An item's result may be an exception
      instance to fail only that item.
    * optionally ``close(self)``: runs once when the pool stops the worker (shutdown).

    The instance is created in the worker process with no arguments; keep state on ``self``.
    """

    def spawn(self, *args: Any, **kwargs: Any) -> SpawnR:
        """Set the worker up; runs once in the worker process. Default: do nothing."""
        return None  # type: ignore[return-value]

    def execute(self, *args: Any, **kwargs: Any) -> ExecR:
        """Run one task in the worker process."""
        raise NotImplementedError(f"{type(self).__qualname__} does not define execute()")

    def close(self) -> None:
        """Release what ``spawn`` acquired (files, connections, a GPU); runs once in the
        worker process when the pool stops it. Default: do nothing.

        The process then leaves with ``os._exit`` after flushing stdout, stderr and logging,
        skipping the interpreter's teardown (seconds with torch loaded). A worker that is
        killed (crash, ``hang_timeout``, shutdown deadline, second Ctrl-C) does not run it.
        """


_current: list[dict[str, Any]] = []


def current_contexts() -> list[dict[str, Any]]:
    """In a worker, during ``execute`` / ``execute_batch``: the context of each task being run
    (one for ``execute``, one per item for ``execute_batch``), as given to
    ``pool.with_context(...)``; ``{}`` for a task without one. Elsewhere: ``[]``.

    Use it to carry a request id into the worker's logs or a trace context into its spans.
    """
    return list(_current)


def defines_execute_batch(worker_cls: type) -> bool:
    return callable(getattr(worker_cls, "execute_batch", None))


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker as soon as its parent is gone (reparented to init or a subreaper)."""
    while True:
        time.sleep(_PARENT_CHECK_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(70)


def _run_one(worker: SWorker[Any, Any], task_id: int, payload: bytes) -> tuple[int, m.Outcome]:
    try:
        args, kwargs = m.loads_payload(payload)
        result = worker.execute(*args, **kwargs)
    except Exception as exc:
        return task_id, m.error_outcome(exc)
    return task_id, m.ok_outcome(result)


def _run_batch(
    worker: Any, task_ids: list[int], payloads: list[bytes],
    contexts: list[dict[str, Any] | None] | None = None,
) -> list[tuple[int, m.Outcome]]:
    """Run one ``execute_batch`` call; an item that cannot be unpickled fails alone."""
    outcomes: dict[int, m.Outcome] = {}
    items: list[Any] = []
    item_ids: list[int] = []
    for i, (task_id, payload) in enumerate(zip(task_ids, payloads, strict=True)):
        try:
            items.append(m.loads_payload(payload))
            item_ids.append(task_id)
            if contexts is not None:
                _current.append(contexts[i] or {})
        except Exception as exc:
            outcomes[task_id] = m.error_outcome(exc)
    if items:
        try:
            results = worker.execute_batch(items)
            if not isinstance(results, (list, tuple)) or len(results) != len(items):
                got = (f"{len(results)} results" if isinstance(results, (list, tuple))
                       else f"a {type(results).__name__}")
                raise TypeError(
                    f"{type(worker).__qualname__}.execute_batch returned {got} for a batch of "
                    f"{len(items)} items; it must return a list with one result per item"
                )
        except Exception as exc:
            record = m.error_record(exc)
            for task_id in item_ids:
                outcomes[task_id] = (False, record)
        else:
            for task_id, result in zip(item_ids, results, strict=True):
                if isinstance(result, BaseException):
                    outcomes[task_id] = m.error_outcome(result)
                else:
                    outcomes[task_id] = m.ok_outcome(result)
    return [(task_id, outcomes[task_id]) for task_id in task_ids]


def spawn_worker(worker_cls: type[SWorker[Any, Any]] | ClassRef, payload: m.Payload
                 ) -> tuple[SWorker[Any, Any] | None, m.Outcome]:
    """Create the worker and run its ``spawn``; ``None`` and an error outcome if that failed.

    Runs in the worker process (or Ray actor).
    """
    try:
        if isinstance(worker_cls, bytes):
            m.pickle_by_value()
        cls = worker_cls if isinstance(worker_cls, type) else load_class(worker_cls)
        args, kwargs = m.loads_payload(payload)
        worker = cls()
        spawned = worker.spawn(*args, **kwargs)
    except Exception as exc:
        return None, m.error_outcome(exc)
    outcome = m.ok_outcome(spawned)
    return (worker if outcome[0] else None), outcome


def run_message(worker: SWorker[Any, Any], kind: int, key: Any, blobs: Any
                ) -> list[tuple[int, m.Outcome]] | None:
    """Run one EXEC or BATCH message; ``None`` for STOP (or anything unknown).

    Runs in the worker process (or Ray actor).
    """
    if kind == m.EXEC:
        if type(key) is tuple:  # (task_id, context)
            key, context = key
            _current[:] = [context]
            try:
                return [_run_one(worker, key, blobs[0])]
            finally:
                _current.clear()
        return [_run_one(worker, key, blobs[0])]
    if kind == m.BATCH:
        if type(key) is tuple:  # (task_ids, contexts)
            key, contexts = key
            try:
                return _run_batch(worker, key, blobs, contexts)
            finally:
                _current.clear()
        return _run_batch(worker, key, blobs)
    return None


def _exit_now(code: int) -> NoReturn:
    """Leave the process without the interpreter's teardown (seconds with torch loaded):
    flush what the user may have written, then ``os._exit``."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_after_failed_spawn(send: Any, outcome: m.Outcome) -> NoReturn:
    """Report a failed spawn and leave at once: threads the failed spawn started must not
    keep the process alive."""
    try:
        m.send_outcomes(send, m.SPAWNED, [(None, outcome)])
    finally:
        _exit_now(1)


def _close_and_exit(worker: SWorker[Any, Any]) -> NoReturn:
    """Run the worker's ``close()`` hook, then leave at once."""
    code = 0
    try:
        worker.close()
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit_now(code)


def worker_main(conn: Connection, worker_cls: ClassRef, parent_pid: int) -> None:
    """Entry point of a worker process: spawn once, then answer tasks until told to stop.

    Runs in the worker process.
    """
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's default, a process
    # manager, kill -- -PGID), reach the workers too: the parent decides how to shut down, so
    # running tasks can be drained. A worker whose parent died still exits (_watch_parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="stateful_pool-parent-watch").start()
    send = conn.send_bytes
    try:
        _, _, blobs = m.recv_message(conn.recv_bytes)
        assert blobs is not None
        payload = blobs[0]
    except (EOFError, OSError):
        return  # the parent gave up on this worker before it started
    worker, outcome = spawn_worker(worker_cls, payload)
    if worker is None:
        _exit_after_failed_spawn(send, outcome)
    m.send_outcomes(send, m.SPAWNED, [(None, outcome)])
    recv = conn.recv_bytes
    while True:
        try:
            kind, key, blobs = m.recv_message(recv)
        except (EOFError, OSError):
            _close_and_exit(worker)  # the parent closed the pipe or died
        reply = run_message(worker, kind, key, blobs)
        if reply is None:
            _close_and_exit(worker)  # STOP
        try:
            m.send_outcomes(send, m.RESULTS, reply)
        except (EOFError, OSError):
            _close_and_exit(worker)
