"""Running the user's worker: spawn it, then run the EXEC and BATCH messages it receives.

Runs in the worker process (or Ray actor). The message loop around it is
``_worker.worker_main`` (or the Ray actor); streams are ``_streams.StreamRunner``.
"""

from __future__ import annotations

import pickle
from types import GeneratorType
from typing import TYPE_CHECKING, Any

from . import _messages as m
from . import _outcomes as o
from ._classref import ClassRef, load_class

if TYPE_CHECKING:
    from ._worker import SWorker

# The contexts of the tasks being run now (``current_contexts()``).
current: list[dict[str, Any]] = []


class Host:
    """The user's worker in its process, with the pickler for the objects it sends back."""

    def __init__(self, worker: SWorker[Any, Any], dumps: m.Dumps) -> None:
        self.worker = worker
        self.dumps = dumps


def spawn_worker(worker_cls: type[SWorker[Any, Any]] | ClassRef, payload: m.Payload,
                 dumps: m.Dumps | None = None) -> tuple[Host | None, o.Outcome]:
    """Create the worker and run its ``spawn``; ``None`` and an error outcome if that failed.

    A class that came by value pickles its objects by value too (cloudpickle, or ``dumps``
    when given: the Ray actor passes Ray's own)."""
    if dumps is None:
        dumps = pickle.dumps
        if isinstance(worker_cls, bytes):
            try:
                dumps = m.by_value_dumps()
            except Exception as exc:
                return None, o.error_outcome(exc, pickle.dumps)
    try:
        cls = worker_cls if isinstance(worker_cls, type) else load_class(worker_cls)
        args, kwargs = m.loads_payload(payload)
        worker = cls()
        spawned = worker.spawn(*args, **kwargs)
    except Exception as exc:
        return None, o.error_outcome(exc, dumps)
    outcome = o.ok_outcome(spawned, dumps)
    return (Host(worker, dumps) if outcome[0] else None), outcome


def run_one(host: Host, task_id: int, payload: m.Payload) -> tuple[int, o.Outcome]:
    try:
        args, kwargs = m.loads_payload(payload)
        result = host.worker.execute(*args, **kwargs)
        if type(result) is GeneratorType:  # a streaming worker called with execute()
            result = list(result)
    except Exception as exc:
        return task_id, o.error_outcome(exc, host.dumps)
    return task_id, o.ok_outcome(result, host.dumps)


def run_batch(host: Host, task_ids: list[int], payloads: list[m.Payload],
              contexts: list[dict[str, Any] | None] | None) -> list[tuple[int, o.Outcome]]:
    """Run one ``execute_batch`` call; an item that cannot be unpickled fails alone."""
    dumps = host.dumps
    outcomes: dict[int, o.Outcome] = {}
    items: list[Any] = []
    item_ids: list[int] = []
    for i, (task_id, payload) in enumerate(zip(task_ids, payloads, strict=True)):
        try:
            items.append(m.loads_payload(payload))
            item_ids.append(task_id)
            if contexts is not None:
                current.append(contexts[i] or {})
        except Exception as exc:
            outcomes[task_id] = o.error_outcome(exc, dumps)
    if items:
        worker: Any = host.worker
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
            record = o.error_record(exc, dumps)
            for task_id in item_ids:
                outcomes[task_id] = (False, record)
        else:
            for task_id, result in zip(item_ids, results, strict=True):
                if isinstance(result, BaseException):
                    outcomes[task_id] = o.error_outcome(result, dumps)
                else:
                    outcomes[task_id] = o.ok_outcome(result, dumps)
    return [(task_id, outcomes[task_id]) for task_id in task_ids]


def run_message(host: Host, message: m.Message) -> list[tuple[int, o.Outcome]]:
    """Run one EXEC or BATCH message; its outcomes, one per task."""
    contexts = message.contexts
    assert message.blobs is not None
    try:
        if message.kind == m.Kind.EXEC:
            if contexts is not None:
                current[:] = [contexts[0] or {}]
            return [run_one(host, message.ids[0], message.blobs[0])]
        return run_batch(host, message.ids, message.blobs, contexts)
    finally:
        current.clear()
