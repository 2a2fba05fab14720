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
# Pickles the user's objects in a worker (results, exceptions): cloudpickle in a worker whose
# class came by value, so that what was defined beside that class (a notebook's dataclasses,
# exceptions) crosses too. The parent picks per pool (``dumps_payload``'s ``by``).
user_dumps: Any = pickle.dumps


def by_value_dumps() -> Any:
    """cloudpickle's ``dumps``: the parent has it whenever a class travels by value."""
    import cloudpickle  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return cloudpickle.dumps


def pickle_by_value() -> None:
    """Runs in the worker process, when its class came by value."""
    global user_dumps
    user_dumps = by_value_dumps()

INLINE_MAX = 64 * 1024
# Containers searched for large ``bytes`` arguments (see dumps_payload): how deep, how long.
_SWAP_DEPTH = 3
_SWAP_MAX_LEN = 256

# A task's payload: pickled bytes, or (pickled bytes, out-of-band buffers) when the arguments
# held large ``bytes`` objects.
Payload = bytes | tuple[bytes, list[Any]]


def _swap_large_bytes(obj: Any, depth: int) -> Any:
    """``obj`` with every large ``bytes`` inside (a few levels of plain lists, tuples and
    dicts) wrapped in a ``PickleBuffer``, or ``obj`` itself when there is none."""
    t = type(obj)
    if t is bytes:
        return pickle.PickleBuffer(obj) if len(obj) > INLINE_MAX else obj
    if depth == 0 or (t is not tuple and t is not list and t is not dict):
        return obj
    if len(obj) > _SWAP_MAX_LEN:
        return obj
    if t is dict:
        values = {k: _swap_large_bytes(v, depth - 1) for k, v in obj.items()}
        return obj if all(values[k] is v for k, v in obj.items()) else values
    items = [_swap_large_bytes(x, depth - 1) for x in obj]
    if all(a is b for a, b in zip(items, obj, strict=True)):
        return obj
    return items if t is list else tuple(items)


_CONTAINERS = frozenset({bytes, tuple, list, dict})


def _may_hold_large_bytes(obj: Any) -> bool:
    """Cheap screen for the usual call ``(args, kwargs)`` of scalars: no walk, no recursion
    (this runs on every submit; the walk costs several microseconds)."""
    if type(obj) is tuple and len(obj) == 2 and type(obj[0]) is tuple and type(obj[1]) is dict:
        args, kwargs = obj
        return (any(type(a) in _CONTAINERS for a in args)
                or any(type(v) in _CONTAINERS for v in kwargs.values()))
    return type(obj) in _CONTAINERS


def dumps_payload(obj: Any, by: Any = None) -> Payload:
    """Pickle a task's arguments in the caller (or its result in the worker), with ``by``
    (default ``user_dumps``).

    Large ``bytes`` arguments (an uploaded image, a serialized tensor) are not copied into
    the pickle: they travel out of band (pickle protocol 5) as frames of their own, straight
    from the caller's object to the pipe, and the worker gets the received frame itself.
    ``bytes`` are immutable, so sending them later is the same as copying them now. Pickling
    a 1 MiB ``bytes`` costs 0.44 ms here; this costs nothing.
    """
    by = by or user_dumps
    if not _may_hold_large_bytes(obj):
        return by(obj, PROTOCOL)  # type: ignore[no-any-return]
    swapped = _swap_large_bytes(obj, _SWAP_DEPTH)
    if swapped is obj:
        return by(obj, PROTOCOL)  # type: ignore[no-any-return]
    buffers: list[pickle.PickleBuffer] = []
    data = by(swapped, PROTOCOL, buffer_callback=buffers.append)
    return (data, [b.raw() for b in buffers])


def loads_payload(payload: Payload) -> Any:
    if type(payload) is tuple:
        data, buffers = payload
        return loads(data, buffers=buffers)
    return loads(payload)  # type: ignore[arg-type]


def _size(blob: Payload) -> int:
    if type(blob) is tuple:
        return len(blob[0]) + sum(memoryview(b).nbytes for b in blob[1])
    return len(blob)


def is_large(blob: Payload) -> bool:
    return type(blob) is tuple or len(blob) > INLINE_MAX


def send_message(send: Any, kind: int, key: Any, blobs: list[Payload] | None) -> None:
    """Send one message; large blobs follow the header as frames of their own."""
    if blobs is None or not any(is_large(b) for b in blobs):
        send(dumps((kind, key, blobs), PROTOCOL))
        return
    send_large_message(send, kind, key, blobs)


def send_large_message(send: Any, kind: int, key: Any, blobs: list[Payload]) -> None:
    header: list[Any] = []
    frames: list[Any] = []
    for b in blobs:
        if type(b) is tuple:
            data, buffers = b
            small = len(data) <= INLINE_MAX
            header.append(("oob", data if small else None, len(buffers)))
            if not small:
                frames.append(data)
            frames.extend(buffers)
        elif len(b) > INLINE_MAX:
            header.append(None)
            frames.append(b)
        else:
            header.append(b)
    send(dumps((kind, key, header), PROTOCOL))
    for frame in frames:
        send(frame)


def recv_message(recv: Any) -> tuple[int, Any, list[Payload] | None]:
    """Receive one message sent by ``send_message``, frames included."""
    kind, key, header = loads(recv())
    if header is None or all(type(h) is bytes for h in header):
        return kind, key, header
    blobs: list[Payload] = []
    for h in header:
        if h is None:
            blobs.append(recv())
        elif type(h) is tuple:
            _, data, count = h
            if data is None:
                data = recv()
            blobs.append((data, [recv() for _ in range(count)]))
        else:
            blobs.append(h)
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
        data: bytes | None = user_dumps(exc, PROTOCOL)
    except Exception as pickling_error:
        tb += f"\n(the exception could not be pickled in the worker: {pickling_error!r})\n"
        data = None
    return (type_name(exc), _safe_str(exc), tb, data)


def ok_outcome(result: object) -> Outcome:
    """Pickle one result; an unpicklable result becomes an error outcome for its task only.

    Runs in the worker process.
    """
    try:
        return (True, type_name(result), dumps_payload(result))
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
            return True, loads_payload(data)
        except Exception as exc:
            message = f"result could not be rebuilt in the parent: {exc!r}"
            return False, RemoteError(f"{name}: {message}", type_name=name,
                                      remote_message=message, remote_traceback="")
    return False, rebuild_error(outcome[1])
