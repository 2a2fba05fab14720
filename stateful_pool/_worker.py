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
from . import _outcomes as o
from . import _runner
from ._classref import ClassRef
from ._stream_worker import StreamRunner

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


def current_contexts() -> list[dict[str, Any]]:
    """In a worker, during ``execute`` / ``execute_batch``: the context of each task being run
    (one for ``execute``, one per item for ``execute_batch``), as given to
    ``pool.with_context(...)``; ``{}`` for a task without one. Elsewhere: ``[]``.

    Use it to carry a request id into the worker's logs or a trace context into its spans.
    """
    return list(_runner.current)


def defines_execute_batch(worker_cls: type) -> bool:
    return callable(getattr(worker_cls, "execute_batch", None))


def _watch_parent(parent_pid: int) -> None:
    """Exit the worker as soon as its parent is gone (reparented to init or a subreaper)."""
    while True:
        time.sleep(_PARENT_CHECK_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(70)


def _exit_now(code: int) -> NoReturn:
    """Leave the process without the interpreter's teardown (seconds with torch loaded):
    flush what the user may have written, then ``os._exit``."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_after_failed_spawn(send: Any, outcome: o.Outcome) -> NoReturn:
    """Report a failed spawn and leave at once: threads the failed spawn started must not
    keep the process alive."""
    try:
        o.send_outcomes(send, m.Kind.SPAWNED, [(0, outcome)])
    finally:
        _exit_now(1)


def _close_and_exit(host: _runner.Host) -> NoReturn:
    """Run the worker's ``close()`` hook, then leave at once."""
    code = 0
    try:
        host.worker.close()
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
    send = m.frame_sender(conn)
    try:
        blobs = m.recv_message(m.frame_receiver(conn)).blobs
        assert blobs is not None
        payload = blobs[0]
    except (EOFError, OSError):
        return  # the parent gave up on this worker before it started
    host, outcome = _runner.spawn_worker(worker_cls, payload)
    if host is None:
        _exit_after_failed_spawn(send, outcome)
    o.send_outcomes(send, m.Kind.SPAWNED, [(0, outcome)])
    streams = StreamRunner(host, conn)
    K = m.Kind
    recv = streams.recv
    backlog = streams.backlog
    plain = not streams.collects
    while True:
        try:
            if backlog:
                message = backlog.popleft()
            else:
                frame = recv()
                if frame[0] == m.EXEC1 and plain:  # the usual task: one, without a context
                    task_id, blob = m.read_exec1(frame)
                    o.send_outcomes(send, K.RESULTS, [_runner.run_one(host, task_id, blob)])
                    continue
                message = m.recv_message(recv, frame)
            kind = message.kind
            if kind == K.STREAM or (kind == K.EXEC and streams.collects):
                streams.run(message)
                continue
            if kind == K.EXEC or kind == K.BATCH:
                reply = _runner.run_message(host, message)
            elif kind == K.STOP:
                _close_and_exit(host)
            else:
                continue  # CREDIT or CANCEL for a stream that has ended: nothing to do
            o.send_outcomes(send, K.RESULTS, reply)
        except (EOFError, OSError):
            _close_and_exit(host)  # the parent closed the pipe or died
