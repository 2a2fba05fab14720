"""What travels over a worker's pipe: the message kinds and the one way they are framed.

Every message is one header, a pickled tuple of five fields and a frame count, then that
many frames::

    (kind, ids, metas, contexts, blobs), frames

``kind`` is a :class:`Kind` (sent as its int value); ``ids`` the task ids the message is about
(empty for SPAWN, SPAWNED and STOP); ``metas`` one small kind-specific value per id, or
``None``; ``contexts`` one task context per id (``pool.with_context``), or ``None`` when no
task of the message has one; ``blobs`` the pickled user objects (arguments, results, chunks),
or ``None``.

User objects are pickled on their own, before the header, so a header can always be read
even when the object inside cannot be rebuilt; that one task then fails with a
:class:`~stateful_pool.errors.RemoteError` and nothing else is affected. A blob larger than
``INLINE_MAX`` is not copied into the header: the header carries a placeholder and the blob
follows as a frame of its own, so a 1 MiB argument is pickled once by the caller and never
copied again on its way to the worker (each extra 1 MiB copy costs about 0.4 ms in fresh pages
here).

Parent -> worker::

    SPAWN    ids []        blobs [(args, kwargs)]
    EXEC     ids [id]      blobs [(args, kwargs)]                contexts maybe
    BATCH    ids [id...]   blobs [item, ...]                     contexts maybe
    STREAM   ids [id]      metas [window]  blobs [(args, kwargs)] contexts maybe
    CREDIT   ids [id]      metas [chunks the reader took]
    CANCEL   ids [id]      (stop that stream at its next yield)
    STOP     ids []

Worker -> parent::

    SPAWNED  ids [0]       metas [meta]    blobs [result or b""]
    RESULTS  ids [id...]   metas [meta...] blobs [result or b"", ...]
    CHUNKS   ids [id]      blobs [chunk, ...]   (a stream's chunks, in order, grouped)

where ``meta`` is ``(True, type_name)`` or ``(False, error_record)`` (see ``_outcomes``). A
stream ends with a RESULTS message for its id, like any task. CREDIT and CANCEL for a task the
worker no longer runs are ignored.

The two messages of nearly every task, an EXEC of one task without a context and the RESULTS
of one task that succeeded, with a blob small enough to go inline, skip the pickled header:
they are one frame of a fixed binary head and the blob (``EXEC1``, ``RESULT1`` below), which
costs a few microseconds less on each side of the pipe. A pickled header starts with the
pickle protocol byte 0x80, so the first byte tells the two forms apart.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple

PROTOCOL = pickle.HIGHEST_PROTOCOL


class Kind(IntEnum):
    SPAWN = 0
    EXEC = 1
    BATCH = 2
    STOP = 3
    STREAM = 4
    CREDIT = 5
    CANCEL = 6
    SPAWNED = 10
    RESULTS = 11
    CHUNKS = 12


_KINDS = {k.value: k for k in Kind}
_VALUES = {k: k.value for k in Kind}  # (an enum's .value is a slow property)


class Message(NamedTuple):
    kind: Kind
    ids: list[int]
    metas: list[Any] | None
    contexts: list[dict[str, Any] | None] | None
    blobs: list[Payload] | None


# What pickles the user's objects: ``pickle.dumps``, or cloudpickle's where the worker class
# travelled by value (the types defined beside such a class must follow it).
Dumps = Callable[..., bytes]

dumps = pickle.dumps
loads = pickle.loads

INLINE_MAX = 64 * 1024

# The compact frames: a head of (tag, task id), then for RESULT1 the length of the result's
# type name and the name, then the blob.
EXEC1 = 1
RESULT1 = 2
_HEAD = struct.Struct("<BQ")
_RESULT_HEAD = struct.Struct("<BQH")
_EXEC_HEAD_LEN = _HEAD.size
_RESULT_HEAD_LEN = _RESULT_HEAD.size
_pack_head = _HEAD.pack
_pack_result_head = _RESULT_HEAD.pack
_unpack_result_head = _RESULT_HEAD.unpack_from
_unpack_head = _HEAD.unpack_from
# Containers searched for large ``bytes`` arguments (see dumps_payload): how deep, how long.
_SWAP_DEPTH = 3
_SWAP_MAX_LEN = 256

# A pickled user object: bytes, or (pickled bytes, out-of-band buffers) when it held large
# ``bytes`` objects.
Payload = bytes | tuple[bytes, list[Any]]


def by_value_dumps() -> Dumps:
    """cloudpickle's ``dumps``: the parent has it whenever a class travels by value."""
    import cloudpickle  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return cloudpickle.dumps  # type: ignore[no-any-return]


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
        for a in args:  # loops, not any(): a generator costs more than the usual check
            if type(a) in _CONTAINERS:
                return True
        if kwargs:
            for v in kwargs.values():
                if type(v) in _CONTAINERS:
                    return True
        return False
    return type(obj) in _CONTAINERS


def dumps_payload(obj: Any, by: Dumps | None = None) -> Payload:
    """Pickle a task's arguments in the caller (or a result or chunk in the worker) with
    ``by`` (default ``pickle.dumps``).

    Large ``bytes`` arguments (an uploaded image, a serialized tensor) are not copied into
    the pickle: they travel out of band (pickle protocol 5) as frames of their own, straight
    from the caller's object to the pipe, and the worker gets the received frame itself.
    ``bytes`` are immutable, so sending them later is the same as copying them now. Pickling
    a 1 MiB ``bytes`` costs 0.44 ms here; this costs nothing.
    """
    by = by or dumps
    if not _may_hold_large_bytes(obj):
        return by(obj, PROTOCOL)
    swapped = _swap_large_bytes(obj, _SWAP_DEPTH)
    if swapped is obj:
        return by(obj, PROTOCOL)
    buffers: list[pickle.PickleBuffer] = []
    data = by(swapped, PROTOCOL, buffer_callback=buffers.append)
    return (data, [b.raw() for b in buffers])


def loads_payload(payload: Payload) -> Any:
    if type(payload) is tuple:
        data, buffers = payload
        return loads(data, buffers=buffers)
    return loads(payload)  # type: ignore[arg-type]


def is_large(blob: Payload) -> bool:
    return type(blob) is tuple or len(blob) > INLINE_MAX


def has_large(blobs: list[Payload] | None) -> bool:
    """Whether a message with these blobs has frames beyond its header."""
    if not blobs:
        return False
    for b in blobs:
        if type(b) is tuple or len(b) > INLINE_MAX:
            return True
    return False


def exec1(task_id: int, blob: bytes) -> bytes:
    """The compact EXEC frame of one task without a context (``blob``: inline bytes)."""
    return _pack_head(EXEC1, task_id) + blob


def read_exec1(frame: bytes) -> tuple[int, bytes]:
    """``(task_id, blob)`` of an EXEC1 frame."""
    return _unpack_head(frame)[1], frame[_EXEC_HEAD_LEN:]


def result1(task_id: int, type_name: str, blob: bytes) -> bytes:
    """The compact RESULTS frame of one task's result (``blob``: inline bytes)."""
    name = type_name.encode()
    return _pack_result_head(RESULT1, task_id, len(name)) + name + blob


def read_result1(frame: bytes) -> tuple[int, str, bytes]:
    """``(task_id, type_name, blob)`` of a RESULT1 frame."""
    _, task_id, size = _unpack_result_head(frame)
    end = _RESULT_HEAD_LEN + size
    return task_id, frame[_RESULT_HEAD_LEN:end].decode(), frame[end:]


def encode(kind: Kind, ids: list[int], metas: list[Any] | None = None,
           contexts: list[dict[str, Any] | None] | None = None,
           blobs: list[Payload] | None = None) -> list[Any]:
    """The frames of one message: its pickled header, then each large blob."""
    if blobs is not None and len(blobs) == 1 and contexts is None:
        blob = blobs[0]
        if type(blob) is bytes and len(blob) <= INLINE_MAX:
            if kind is Kind.EXEC:
                return [exec1(ids[0], blob)]
            if kind is Kind.RESULTS and metas is not None and metas[0][0] is True:
                return [result1(ids[0], metas[0][1], blob)]
    if not has_large(blobs):
        return [dumps((_VALUES[kind], ids, metas, contexts, blobs, 0), PROTOCOL)]
    assert blobs is not None
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
    return [dumps((_VALUES[kind], ids, metas, contexts, header, len(frames)), PROTOCOL),
            *frames]


# A frame on the pipe, as ``multiprocessing.connection`` writes it: a signed 32-bit
# big-endian length (-1, then an unsigned 64-bit one, past 2 GiB), then the bytes.
_SIZE = struct.Struct("!i")
_BIG_SIZE = struct.Struct("!Q")
# Frames up to this size go out in one write with their length (as multiprocessing does).
_ONE_WRITE = 16 * 1024


def frame_sender(conn: Any) -> Callable[[Any], None]:
    """``conn.send_bytes`` for this pipe, the usual small frame in one ``os.write`` without
    the connection's Python layers (a few microseconds per message, on each side)."""
    fd = conn.fileno()
    slow = conn.send_bytes
    pack = _SIZE.pack
    write = os.write

    def send(data: Any) -> None:
        if type(data) is not bytes or len(data) > _ONE_WRITE:
            slow(data)
            return
        buf = pack(len(data)) + data
        done = write(fd, buf)
        while done < len(buf):  # a signal cut the write short
            done += write(fd, memoryview(buf)[done:])

    return send


def _read_rest(fd: int, head: bytes, size: int) -> bytes:
    """``head`` plus what follows it on ``fd`` up to ``size`` bytes (EOFError if it ends)."""
    if not head:
        raise EOFError
    parts = [head]
    got = len(head)
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def frame_receiver(conn: Any) -> Callable[[], bytes]:
    """``conn.recv_bytes`` for this pipe: two ``os.read`` calls for the usual frame, without
    the connection's Python layers. ``EOFError`` once the other end is gone."""
    fd = conn.fileno()
    read = os.read
    unpack = _SIZE.unpack

    def recv() -> bytes:
        head = read(fd, 4)
        if len(head) != 4:
            head = _read_rest(fd, head, 4)
        (size,) = unpack(head)
        if size == -1:
            (size,) = _BIG_SIZE.unpack(_read_rest(fd, read(fd, 8), 8))
        if size == 0:
            return b""
        data = read(fd, size)
        if len(data) != size:
            data = _read_rest(fd, data, size)
        return data

    return recv


def send_message(send: Callable[[Any], None], kind: Kind, ids: list[int],
                 metas: list[Any] | None = None,
                 contexts: list[dict[str, Any] | None] | None = None,
                 blobs: list[Payload] | None = None) -> None:
    """Send one message (``send`` is a connection's ``send_bytes``)."""
    for frame in encode(kind, ids, metas, contexts, blobs):
        send(frame)


def recv_message(recv: Callable[[], bytes], first: bytes | None = None) -> Message:
    """Receive one message sent by ``send_message``, frames included (``first``: its first
    frame, when the caller has read it already)."""
    data = recv() if first is None else first
    tag = data[0]
    if tag == RESULT1:
        task_id, name, blob = read_result1(data)
        return Message(Kind.RESULTS, [task_id], [(True, name)], None, [blob])
    if tag == EXEC1:
        task_id, blob = read_exec1(data)
        return Message(Kind.EXEC, [task_id], None, None, [blob])
    kind, ids, metas, contexts, header, frames = loads(data)
    if not frames:
        return Message(_KINDS[kind], ids, metas, contexts, header)
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
    return Message(_KINDS[kind], ids, metas, contexts, blobs)
