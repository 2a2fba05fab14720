"""What travels over a worker's pipe, and how errors and results cross it.

Every message is one pickled tuple whose first item is its kind. User objects (arguments,
results, exceptions) ride inside as bytes pickled on their own, so a message header can always
be read even when the object inside cannot be rebuilt; that one task then fails with a
:class:`~stateful_pool.errors.RemoteError` and nothing else is affected.

Every message is ``(kind, key, blobs)``: ``blobs`` is a list of pickled user objects. A blob
larger than ``INLINE_MAX`` is not copied into the header: the header carries ``None`` in its
place and the blob follows as a frame of its own, so a 1 MiB argument is pickled once by the
caller and never copied again on its way to the worker (each extra 1 MiB copy costs about
0.4 ms in fresh pages here).

Parent -> worker::

    (SPAWN, None, [pickle((args, kwargs))])
    (EXEC, task_id, [pickle((args, kwargs))])
    (BATCH, [task_id, ...], [pickle(item), ...])
    (STOP, None, None)

Worker -> parent::

    (SPAWNED, [(None, meta)], [result blob if ok])
    (RESULTS, [(task_id, meta), ...], [result blob of each ok task, in order])

where ``meta`` is ``(True, type_name)`` or ``(False, error_record)``, and an error record is
``(type_name, message, traceback_text, pickled_exception_or_None)``. In memory an outcome is
``(True, type_name, blob)`` or ``(False, error_record)``.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from .errors import RemoteError

SPAWN = 0
EXEC = 1
BATCH = 2
STOP = 3
SPAWNED = 10
RESULTS = 11

PROTOCOL = pickle.HIGHEST_PROTOCOL

ErrorRecord = tuple[str, str, str, bytes | None]
Outcome = tuple[Any, ...]  # (True, type_name, bytes) | (False, ErrorRecord)

dumps = pickle.dumps
loads = pickle.loads

INLINE_MAX = 64 * 1024


def send_message(send: Any, kind: int, key: Any, blobs: list[bytes] | None) -> None:
    """Send one message; large blobs follow the header as frames of their own."""
    if blobs is None or all(len(b) <= INLINE_MAX for b in blobs):
        send(dumps((kind, key, blobs), PROTOCOL))
        return
    inline = [b if len(b) <= INLINE_MAX else None for b in blobs]
    send(dumps((kind, key, inline), PROTOCOL))
    for b in blobs:
        if len(b) > INLINE_MAX:
            send(b)


def recv_message(recv: Any) -> tuple[int, Any, list[bytes] | None]:
    """Receive one message sent by ``send_message``, frames included."""
    kind, key, blobs = loads(recv())
    if blobs is not None and None in blobs:
        blobs = [recv() if b is None else b for b in blobs]
    return kind, key, blobs


def send_outcomes(send: Any, kind: int, pairs: list[tuple[Any, Outcome]]) -> None:
    """Send ``[(task_id, outcome), ...]`` with the result blobs out of the header."""
    metas = []
    blobs = []
    for task_id, outcome in pairs:
        if outcome[0]:
            metas.append((task_id, (True, outcome[1])))
            blobs.append(outcome[2])
        else:
            metas.append((task_id, outcome))
    send_message(send, kind, metas, blobs)


def join_outcomes(metas: list[tuple[Any, Any]], blobs: list[bytes]) -> list[tuple[Any, Outcome]]:
    """Inverse of ``send_outcomes``: put each result blob back into its outcome."""
    blob_iter = iter(blobs)
    return [(task_id, (True, meta[1], next(blob_iter)) if meta[0] else meta)
            for task_id, meta in metas]


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of a re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return '\n"""\n' + self.tb.rstrip() + '\n"""'


def type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception as exc:  # a broken __str__ must not take the worker down
        return f"<str() failed: {exc!r}>"


def error_record(exc: BaseException) -> ErrorRecord:
    """Describe an exception raised in the worker so that the parent can rebuild it.

    Runs in the worker process.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data: bytes | None = dumps(exc, PROTOCOL)
    except Exception as pickling_error:
        tb += f"\n(the exception could not be pickled in the worker: {pickling_error!r})\n"
        data = None
    return (type_name(exc), _safe_str(exc), tb, data)


def ok_outcome(result: object) -> Outcome:
    """Pickle one result; an unpicklable result becomes an error outcome for its task only.

    Runs in the worker process.
    """
    try:
        return (True, type_name(result), dumps(result, PROTOCOL))
    except Exception as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return (False, (type_name(result), f"result could not be pickled: {_safe_str(exc)}",
                        tb, None))


def error_outcome(exc: BaseException) -> Outcome:
    return (False, error_record(exc))


def rebuild_error(record: ErrorRecord) -> BaseException:
    """Turn an error record into an exception instance (a new one on every call)."""
    name, message, tb, data = record
    if data is not None:
        try:
            exc = loads(data)
        except Exception as rebuild_failure:
            reason = f"could not be rebuilt in the parent: {rebuild_failure!r}"
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb)
                return exc
            reason = f"unpickled to a non-exception {type_name(exc)}"
    elif message.startswith("result could not be pickled"):
        reason = "the result could not be sent from the worker"
    else:
        reason = "could not be pickled in the worker"
    return RemoteError(f"{name}: {message} ({reason})", type_name=name,
                       remote_message=message, remote_traceback=tb)


def rebuild_outcome(outcome: Outcome) -> tuple[bool, Any]:
    """Return ``(True, result)`` or ``(False, exception)`` for one task's outcome."""
    if outcome[0]:
        _, name, data = outcome
        try:
            return True, loads(data)
        except Exception as exc:
            message = f"result could not be rebuilt in the parent: {exc!r}"
            return False, RemoteError(f"{name}: {message}", type_name=name,
                                      remote_message=message, remote_traceback="")
    return False, rebuild_error(outcome[1])
