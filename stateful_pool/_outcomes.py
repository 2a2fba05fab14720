"""How a task's outcome (a result, or an exception with its traceback) crosses a pipe.

In memory an outcome is ``(True, type_name, blob)`` or ``(False, error_record)``; an error
record is ``(type_name, message, traceback_text, pickled_exception_or_None)``. On the wire
(``_messages``) the result blob rides in the message's ``blobs`` and the rest in its
``metas``, so a result that cannot be rebuilt fails its own task only.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from . import _messages as m
from .errors import RemoteError

ErrorRecord = tuple[str, str, str, bytes | None]
Outcome = tuple[Any, ...]  # (True, type_name, Payload) | (False, ErrorRecord)

_UNPICKLABLE = "could not be pickled"
_UNSENDABLE = (f"result {_UNPICKLABLE}", f"chunk {_UNPICKLABLE}")


def send_outcomes(send: Callable[[Any], None], kind: m.Kind,
                  pairs: list[tuple[int, Outcome]]) -> None:
    """Send ``[(task_id, outcome), ...]`` as one RESULTS (or SPAWNED) message."""
    if len(pairs) == 1 and pairs[0][1][0]:  # one task's result: the usual answer
        task_id, (_, name, blob) = pairs[0]
        if kind is m.Kind.RESULTS and type(blob) is bytes and len(blob) <= m.INLINE_MAX:
            send(m.result1(task_id, name, blob))
        else:
            m.send_message(send, kind, [task_id], [(True, name)], None, [blob])
        return
    ids = []
    metas = []
    blobs: list[m.Payload] = []
    for task_id, outcome in pairs:
        ids.append(task_id)
        if outcome[0]:
            metas.append((True, outcome[1]))
            blobs.append(outcome[2])
        else:
            metas.append(outcome)
            blobs.append(b"")
    m.send_message(send, kind, ids, metas, None, blobs)


def outcomes_of(message: m.Message) -> list[tuple[int, Outcome]]:
    """Inverse of ``send_outcomes``: each task id with its outcome."""
    assert message.metas is not None and message.blobs is not None
    return [(task_id, (True, meta[1], blob) if meta[0] else meta)
            for task_id, meta, blob in zip(message.ids, message.metas, message.blobs,
                                           strict=True)]


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


def error_record(exc: BaseException, dumps: m.Dumps) -> ErrorRecord:
    """Describe an exception raised in the worker so that the parent can rebuild it.

    Runs in the worker process.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data: bytes | None = dumps(exc, m.PROTOCOL)
    except Exception as pickling_error:
        tb += f"\n(the exception could not be pickled in the worker: {pickling_error!r})\n"
        data = None
    return (type_name(exc), _safe_str(exc), tb, data)


def unpicklable(obj: object, what: str, exc: Exception) -> Outcome:
    """The error outcome of a result (or chunk) that could not be pickled in the worker."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (False, (type_name(obj), f"{what} {_UNPICKLABLE}: {_safe_str(exc)}", tb, None))


def ok_outcome(result: object, dumps: m.Dumps) -> Outcome:
    """Pickle one result; an unpicklable result becomes an error outcome for its task only.

    Runs in the worker process.
    """
    try:
        return (True, type_name(result), m.dumps_payload(result, dumps))
    except Exception as exc:
        return unpicklable(result, "result", exc)


def error_outcome(exc: BaseException, dumps: m.Dumps) -> Outcome:
    return (False, error_record(exc, dumps))


def rebuild_error(record: ErrorRecord) -> BaseException:
    """Turn an error record into an exception instance (a new one on every call)."""
    name, message, tb, data = record
    if data is not None:
        try:
            exc = m.loads(data)
        except Exception as rebuild_failure:
            reason = f"could not be rebuilt in the parent: {rebuild_failure!r}"
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb)
                return exc
            reason = f"unpickled to a non-exception {type_name(exc)}"
    elif message.startswith(_UNSENDABLE):
        what = message.split(" ", 1)[0]
        reason = f"the {what} could not be sent from the worker"
    else:
        reason = "could not be pickled in the worker"
    return RemoteError(f"{name}: {message} ({reason})", type_name=name,
                       remote_message=message, remote_traceback=tb)


def rebuild_value(name: str, data: m.Payload, what: str = "result") -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, RemoteError)`` when it cannot be rebuilt here."""
    try:
        return True, m.loads_payload(data)
    except Exception as exc:
        message = f"{what} could not be rebuilt in the parent: {exc!r}"
        return False, RemoteError(f"{name}: {message}", type_name=name,
                                  remote_message=message, remote_traceback="")


def rebuild_outcome(outcome: Outcome) -> tuple[bool, Any]:
    """Return ``(True, result)`` or ``(False, exception)`` for one task's outcome."""
    if outcome[0]:
        return rebuild_value(outcome[1], outcome[2])
    return False, rebuild_error(outcome[1])
