"""The seam between the dispatcher and wherever workers run.

A transport starts one worker and hands the dispatcher two things:

* a *connection*: a duplex byte pipe with ``send_bytes``, ``recv_bytes``, ``poll``,
  ``fileno`` and ``close`` (a ``multiprocessing`` connection) that carries the messages of
  ``_messages.py``;
* a *handle* shaped like ``multiprocessing.Process``: ``pid``, ``sentinel`` (an fd that becomes
  readable when the worker is gone), ``exitcode``, ``join(timeout)``, ``kill()``, and
  optionally ``death_cause`` (a sentence for the crash error) and ``location`` (where it runs).

Dispatch, batching, timeouts and the crash rules live above this seam and do not know which
transport they talk to. ``ProcessTransport`` (local processes and pipes) is the default;
``_ray.RayTransport`` runs each worker as a Ray actor.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from multiprocessing.connection import Connection
from typing import Any, Protocol

from . import _messages as m
from ._classref import ClassRef, class_ref, main_unreachable_hidden
from ._worker import worker_main


class Transport(Protocol):
    name: str

    def start(self, worker_cls: type, worker_id: int, options: dict[str, Any]
              ) -> tuple[Connection, Any]:
        """Start one worker process or actor; it waits for its SPAWN message."""
        ...

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` for per-worker options this transport does not understand."""
        ...

    def check_class(self, worker_cls: type) -> Any:
        """Raise ``TypeError`` if the workers could not rebuild ``worker_cls``. Return the
        ``dumps`` that pickles the user's objects by value (a cloudpickle) when the workers
        need them so (the types defined beside such a class must follow it), else None."""
        ...


class ProcessTransport:
    """Workers as local processes of a ``multiprocessing`` context, talking over a pipe."""

    name = "process"

    def __init__(self, mp_context: Any) -> None:
        self.ctx = mp_context
        self.location = {"host": socket.gethostname(), "node": None}
        self._class_refs: dict[type, ClassRef] = {}

    def check_class(self, worker_cls: type) -> Any:
        ref = self._class_refs[worker_cls] = class_ref(worker_cls)
        return m.by_value_dumps() if isinstance(ref, bytes) else None

    def check_options(self, options: dict[str, Any]) -> None:
        if options:
            raise ValueError(
                f"the process backend takes no per-worker options, got {sorted(options)}; "
                "they are for backend='ray'")

    def start(self, worker_cls: type, worker_id: int, options: dict[str, Any]
              ) -> tuple[Connection, Any]:
        ref = self._class_refs.get(worker_cls)
        if ref is None:
            ref = self._class_refs[worker_cls] = class_ref(worker_cls)
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        try:
            process = self.ctx.Process(
                target=worker_main, args=(child_conn, ref, os.getpid()),
                name=f"stateful_pool-worker-{worker_id}")
            with main_unreachable_hidden():
                process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        process.location = self.location
        return parent_conn, process


def make_transport(backend: str, mp_context: Any) -> Transport:
    """The transport for ``SPool(backend=...)``."""
    if backend == "process":
        return ProcessTransport(mp_context or multiprocessing.get_context("spawn"))
    if backend == "ray":
        if mp_context is not None:
            raise ValueError("mp_context is for backend='process'; Ray starts its own workers")
        from ._ray import RayTransport  # Ray is an optional extra: import it only here

        return RayTransport()
    raise ValueError(f"backend must be 'process' or 'ray', got {backend!r}")
