"""What travels over a worker's pipe, and how errors and results cross it.

Every message is one pickled tuple whose first item is its kind. User objects (arguments,
results, exceptions) ride inside as bytes pickled on their own, so a message header can always
be read even when the object inside cannot be rebuilt; that one task then fails with a
:class:`~stateful_pool.errors.RemoteError` and nothing else is affected.

Parent -> worker::

    (SPAWN, payload)                     payload = pickle((args, kwargs))
    (EXEC, task_id, payload)             payload = pickle((args, kwargs))
    (BATCH, [task_id, ...], [payload])   payload = pickle(item)
    (STOP,)

Worker -> parent::

    (SPAWNED, outcome)
    (RESULTS, [(task_id, outcome), ...])

where an outcome is ``(True, type_name, pickled_result)`` or ``(False, error_record)`` and an
error record is ``(type_name, message, traceback_text, pickled_exception_or_None)``.
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
