"""Streams in the worker: drive the user's generator (or ``stream_step``), send its chunks in
groups, pause on the reader's credit, stop at a CANCEL.

Runs in the worker process. The worker loop (``_worker.worker_main``) hands a STREAM message
here, and for a worker with ``stream_step`` and no ``execute`` of its own an EXEC message too
(its chunks are collected into one result). Messages that arrive meanwhile are read between
steps: CREDIT and CANCEL act at once, a new stream joins a ``stream_step`` batch at its next
step, an EXEC runs between two steps of that batch, anything else waits in ``backlog`` for
the stream to end.

When to send a chunk: at once if the reader has consumed everything sent before (it is
waiting), so the first chunk is never delayed; otherwise it is held and goes with the next
ones, as one message, when the reader catches up, when half the window is held, or when the
oldest held chunk is ``LINGER`` old. That last rule holds during a long step too: a flusher
thread sends what has waited that long while the user's code runs (so a held chunk waits at
most ``LINGER``, plus the GIL's switch interval if the step holds the GIL). The worker never
holds more than ``window`` chunks the reader has not consumed: it stops stepping that stream
until credit comes.

``lock`` guards the streams' held chunks and credit, and the pipe's send side, between the
loop and the flusher; the user's code runs without it.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from . import _messages as m
from . import _outcomes as o
from ._runner import Host, current, run_message

K = m.Kind
# The longest a held chunk waits for others to group with: a millisecond costs a token
# stream nothing and lets a fast generator send tens of chunks per message.
LINGER = 0.001
_UNLIMITED = 1 << 62


class _EndOfStream:
    """What ``stream_step`` returns for a stream that has no more chunks."""

    _instance: _EndOfStream | None = None

    def __new__(cls) -> _EndOfStream:  # one instance, also after unpickling
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "stateful_pool.END_OF_STREAM"

    def __reduce__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM = _EndOfStream()


def defines_stream_step(worker_cls: type) -> bool:
    return callable(getattr(worker_cls, "stream_step", None))


class _Open:
    """One stream the worker runs."""

    __slots__ = ("id", "window", "group", "unread", "held", "held_since", "it", "state",
                 "collect", "context", "cancelled")

    def __init__(self, task_id: int, window: int, context: dict[str, Any] | None,
                 collect: bool) -> None:
        self.id = task_id
        self.window = window
        self.group = max(1, window // 2)
        self.unread = 0  # sent, and not yet credited back by the reader
        self.held: list[m.Payload] = []
        self.held_since = 0.0
        self.it: Any = None
        self.state: Any = None
        self.collect: list[Any] | None = [] if collect else None
        self.context = context
        self.cancelled = False

    @property
    def blocked(self) -> bool:
        return self.unread + len(self.held) >= self.window


class StreamRunner:
    def __init__(self, host: Host, conn: Connection) -> None:
        self.host = host
        self.conn = conn
        self.send = m.frame_sender(conn)
        self.recv = m.frame_receiver(conn)
        self.streams: dict[int, _Open] = {}
        self.backlog: deque[m.Message] = deque()
        self.batched = defines_stream_step(type(host.worker))
        # A stream_step worker without an execute of its own runs execute() tasks as
        # streams whose chunks are collected into one result.
        from ._worker import SWorker  # (imported here: _worker imports this module)

        self.collects = self.batched and type(host.worker).execute is SWorker.execute
        self._ready = select.poll()
        self._ready.register(conn.fileno(), select.POLLIN)
        self.lock = threading.Lock()
        self._held_some = threading.Condition(self.lock)
        self._flusher: threading.Thread | None = None

    def run(self, message: m.Message) -> None:
        """Run a STREAM (or, batched, an EXEC) message and every stream that joins it."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_late, daemon=True,
                                             name="stateful_pool-chunk-flusher")
            self._flusher.start()
        if self.batched:
            self._run_batched(message)
        else:
            self._run_generator(message)

    # ---- one generator ------------------------------------------------------------------

    def _run_generator(self, message: m.Message) -> None:
        s = self._open(message)
        if s is None:
            return
        it = s.it
        outcome: o.Outcome | None = None
        while True:
            self._poll()
            while s.blocked and not s.cancelled:
                with self.lock:
                    self._flush(s)
                self._handle(m.recv_message(self.recv))  # wait for credit
            if s.cancelled:
                break
            self._flush_if_due(s, time.monotonic())  # with the credit just read
            if s.context is not None:
                current[:] = [s.context]
            try:
                chunk = next(it)
            except StopIteration:
                outcome = self._ok()
                break
            except Exception as exc:
                outcome = o.error_outcome(exc, self.host.dumps)
                break
            finally:
                current.clear()
            outcome = self._hold(s, chunk)
            if outcome is not None:
                break
        self._end(s, outcome)

    # ---- a stream_step batch ------------------------------------------------------------

    def _run_batched(self, message: m.Message) -> None:
        self._open(message)
        worker: Any = self.host.worker
        streams = self.streams
        while streams:
            self._poll()  # credit, cancels, and new streams join here: at the next step
            for s in [s for s in streams.values() if s.cancelled]:
                self._end(s, None)
            active = [s for s in streams.values() if not s.blocked]
            if not active:
                with self.lock:
                    for s in streams.values():
                        self._flush(s)
                if streams:
                    self._handle(m.recv_message(self.recv))  # wait for credit or news
                continue
            if any(s.context is not None for s in active):
                current[:] = [s.context or {} for s in active]
            try:
                outs = worker.stream_step([s.state for s in active])
                if not isinstance(outs, (list, tuple)) or len(outs) != len(active):
                    raise TypeError(
                        f"{type(worker).__qualname__}.stream_step returned "
                        f"{_describe(outs)} for {len(active)} streams; it must return a "
                        "list with one chunk (or END_OF_STREAM, or an exception) per stream")
            except Exception as exc:
                record = o.error_record(exc, self.host.dumps)
                for s in active:
                    self._end(s, (False, record))
                continue
            finally:
                current.clear()
            for s, out in zip(active, outs, strict=True):
                if out is END_OF_STREAM:
                    self._end(s, self._ok())
                elif isinstance(out, BaseException):
                    self._end(s, o.error_outcome(out, self.host.dumps))
                elif (failed := self._hold(s, out)) is not None:
                    self._end(s, failed)
            self._poll()
            now = time.monotonic()
            for s in list(streams.values()):
                self._flush_if_due(s, now)

    # ---- shared -----------------------------------------------------------------------------

    def _open(self, message: m.Message) -> _Open | None:
        """Start one stream (``execute`` or ``stream_open``); on failure, end it at once."""
        task_id = message.ids[0]
        collect = message.kind == K.EXEC
        window = _UNLIMITED if collect or not message.metas else message.metas[0]
        context = message.contexts[0] if message.contexts else None
        s = _Open(task_id, window, context, collect)
        worker: Any = self.host.worker
        if context is not None:
            current[:] = [context]
        try:
            assert message.blobs is not None
            args, kwargs = m.loads_payload(message.blobs[0])
            if self.batched:
                s.state = worker.stream_open(*args, **kwargs)
            else:
                s.it = worker.execute(*args, **kwargs)
                if not isinstance(s.it, Iterator):
                    raise TypeError(
                        f"{type(worker).__qualname__}.execute returned {_describe(s.it)}, not "
                        "a generator: to stream, execute must yield its chunks")
        except Exception as exc:
            outcome = o.error_outcome(exc, self.host.dumps)
            with self.lock:
                o.send_outcomes(self.send, K.RESULTS, [(task_id, outcome)])
            return None
        finally:
            current.clear()
        with self.lock:
            self.streams[task_id] = s
        return s

    def _end(self, s: _Open, outcome: o.Outcome | None) -> None:
        """Close the stream in the worker (its ``finally`` runs), send what it held, end it."""
        if s.context is not None:
            current[:] = [s.context]
        try:
            if self.batched:
                close = getattr(self.host.worker, "stream_close", None)
                if close is not None:
                    close(s.state)
            else:
                close = getattr(s.it, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            if outcome is None or outcome[0]:
                outcome = o.error_outcome(exc, self.host.dumps)
        finally:
            current.clear()
        cancelled = outcome is None  # the reader has gone: what is held is for nobody
        if outcome is None:
            outcome = self._ok()
        elif s.collect is not None and outcome[0]:
            outcome = o.ok_outcome(s.collect, self.host.dumps)
        with self.lock:
            del self.streams[s.id]
            if cancelled:
                s.held = []
            self._flush(s)
            o.send_outcomes(self.send, K.RESULTS, [(s.id, outcome)])

    def _ok(self) -> o.Outcome:
        return o.ok_outcome(None, self.host.dumps)

    def _hold(self, s: _Open, chunk: Any) -> o.Outcome | None:
        """Keep one chunk to send; an error outcome if it cannot be pickled."""
        if s.collect is not None:
            s.collect.append(chunk)
            return None
        try:
            blob = m.dumps_payload(chunk, self.host.dumps)
        except Exception as exc:
            return o.unpicklable(chunk, "chunk", exc)
        with self.lock:
            if not s.held:
                s.held_since = time.monotonic()
                self._held_some.notify()
            s.held.append(blob)
        return None

    def _flush_if_due(self, s: _Open, now: float) -> None:
        """Send what ``s`` holds if its reader waits, the group is full, or it is old."""
        with self.lock:
            if s.held and (s.unread == 0 or len(s.held) >= s.group
                           or now - s.held_since >= LINGER):
                self._flush(s)

    def _flush(self, s: _Open) -> None:
        """Send what ``s`` holds (with ``lock`` held)."""
        if s.held:
            held, s.held = s.held, []
            s.unread += len(held)
            m.send_message(self.send, K.CHUNKS, [s.id], None, None, held)

    def _flush_late(self) -> None:
        """The flusher thread: send chunks held ``LINGER`` while the user's code runs."""
        with self._held_some:
            while True:
                now = time.monotonic()
                oldest = min((s.held_since for s in self.streams.values() if s.held),
                             default=None)
                if oldest is None:
                    self._held_some.wait()
                elif oldest + LINGER > now:
                    self._held_some.wait(oldest + LINGER - now)
                else:
                    try:
                        for s in self.streams.values():
                            if s.held and now - s.held_since >= LINGER:
                                self._flush(s)
                    except OSError:
                        return  # the parent has gone; the worker loop notices and exits

    def _poll(self) -> None:
        """Handle what the parent sent, without waiting (once per step: a ``select.poll``
        kept for the pipe costs a microsecond, ``Connection.poll`` builds a selector)."""
        while self._ready.poll(0):
            self._handle(m.recv_message(self.recv))

    def _handle(self, message: m.Message) -> None:
        kind = message.kind
        if kind == K.CREDIT or kind == K.CANCEL:
            s = self.streams.get(message.ids[0])
            if s is None:
                return  # a stream that has ended meanwhile
            if kind == K.CREDIT:
                assert message.metas is not None
                with self.lock:
                    s.unread -= message.metas[0]
            else:
                s.cancelled = True
        elif self.batched and (kind == K.STREAM or (kind == K.EXEC and self.collects)):
            self._open(message)
        elif self.batched and kind == K.EXEC:  # runs between two steps of the batch
            reply = run_message(self.host, message)
            with self.lock:
                o.send_outcomes(self.send, K.RESULTS, reply)
        else:
            self.backlog.append(message)


def _describe(obj: object) -> str:
    return f"a {type(obj).__qualname__}"


def drive_stream(host: Host, message: m.Message, cancelled: Callable[[], bool]
                 ) -> Iterator[tuple[bool, Any]]:
    """One stream, chunk by chunk, for a Ray actor's streaming generator: ``(True,
    [chunk blob])`` per chunk, then ``(False, outcome)``. Flow control is Ray's generator
    backpressure; ``cancelled()`` is read at each yield.

    Runs in the Ray actor.
    """
    worker: Any = host.worker
    context = message.contexts[0] if message.contexts else None
    batched = defines_stream_step(type(worker))
    outcome: o.Outcome | None = None
    state: Any = None
    it: Any = None
    try:
        current[:] = [context] if context is not None else []
        assert message.blobs is not None
        args, kwargs = m.loads_payload(message.blobs[0])
        if batched:
            state = worker.stream_open(*args, **kwargs)
        else:
            it = worker.execute(*args, **kwargs)
            if not isinstance(it, Iterator):
                raise TypeError(
                    f"{type(worker).__qualname__}.execute returned {_describe(it)}, not a "
                    "generator: to stream, execute must yield its chunks")
        while not cancelled():
            if batched:
                (chunk,) = worker.stream_step([state])
                if chunk is END_OF_STREAM:
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
            else:
                try:
                    chunk = next(it)
                except StopIteration:
                    break
            try:
                blob = m.dumps_payload(chunk, host.dumps)
            except Exception as exc:
                outcome = o.unpicklable(chunk, "chunk", exc)
                break
            yield True, [blob]
    except Exception as exc:
        outcome = o.error_outcome(exc, host.dumps)
    finally:
        try:
            if batched and state is not None and hasattr(worker, "stream_close"):
                worker.stream_close(state)
            elif it is not None and hasattr(it, "close"):
                it.close()
        except Exception as exc:
            if outcome is None:
                outcome = o.error_outcome(exc, host.dumps)
        current.clear()
    yield False, outcome if outcome is not None else o.ok_outcome(None, host.dumps)
