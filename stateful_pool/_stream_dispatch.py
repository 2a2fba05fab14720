"""The dispatcher's part for streams: chunks in, credit and stops out, their time limits,
and handing new streams to a worker whose ``stream_step`` batch has room.

``StreamScheduling`` is a base of ``_dispatch.Dispatcher``; callers use ``credit`` and
``stop_stream`` from any thread, everything else runs on the dispatcher thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from . import _messages as m
from ._batching import PendingQueue
from ._deadlines import Deadlines
from ._inbox import Credit, Message, StopStream
from ._slot import WorkerSlot
from ._states import TaskState, WorkerState
from ._stats import Counters
from ._stream import Stream
from ._task import Task, settle
from .errors import TaskTimeoutError

W = WorkerState
T = TaskState


class StreamScheduling:
    # Provided by the Dispatcher.
    inbox: deque[Message]
    wake: Callable[[], None]
    pending: PendingQueue[Task]
    deadlines: Deadlines[Task]
    slots: list[WorkerSlot]
    counts: Counters
    streams_per_worker: int
    release_slot: Callable[[Task], None]

    def _start(self, task: Task) -> bool:
        raise NotImplementedError

    def _send(self, slot: WorkerSlot, tasks: list[Task], now: float) -> None:
        raise NotImplementedError

    # ---- the API callers use, from any thread ---------------------------------------------

    def credit(self, stream: Stream, chunks: int) -> None:
        """A stream's reader consumed ``chunks`` chunks: its worker may send more."""
        self.inbox.append(Credit(stream, chunks))
        self.wake()

    def stop_stream(self, stream: Stream) -> None:
        """A running stream's reader has gone: stop it in the worker."""
        self.inbox.append(StopStream(stream))
        self.wake()

    # ---- the dispatcher thread --------------------------------------------------------------

    def _join_running(self, now: float) -> None:
        """With ``stream_step``: every worker is busy and tasks wait, so hand them to workers
        with room in their running batch; they join it at its next step."""
        pending, room = self.pending, self.streams_per_worker
        for slot in self.slots:
            while (pending and slot.state == W.BUSY and not slot.kill_reason
                   and len(slot.tasks) < room):
                started = [t for t in pending.next_batch(now) if self._start(t)]
                if started:
                    self._send(slot, started, now)

    def _on_chunks(self, slot: WorkerSlot, message: m.Message) -> None:
        now = time.monotonic()
        slot.busy_since = now  # chunks are progress: hang_timeout measures from here
        stream: Any = slot.tasks.get(message.ids[0])
        if stream is None or stream.done():
            return  # stopped or timed out: the worker stops it at its next yield
        assert message.blobs is not None
        first = stream.chunks_received == 0
        stream.on_chunks(message.blobs, now)
        if first and stream.chunk_timeout is not None:
            # Its between-chunk limit starts now, maybe sooner than its heap entry.
            stream.deadline = stream.next_due()
            self.deadlines.push(stream)

    def _expire_stream(self, stream: Stream, now: float) -> None:
        """A time limit of a stream may have passed (or moved on since it was set)."""
        if stream.paused:
            stream.progress_at = now  # waiting for its reader is not the worker's delay
        why = stream.overdue(now)
        if why is None:
            stream.deadline = stream.next_due()
            if stream.deadline is not None:
                self.deadlines.push(stream)
            return
        if stream.state == T.QUEUED:
            self.pending.remove(stream.id)
            if stream.holds_slot:
                self.release_slot(stream)
            message = f"stream {why} before it started; it will not run"
        else:
            self._cancel_in_worker(stream)
            message = (f"stream {why} after {stream.chunks_received} chunks; it was stopped "
                       "in the worker")
        self.counts.timed_out += 1
        stream.state = T.DONE
        stream.forget_pool()
        settle(stream, exc=TaskTimeoutError(message))

    def _on_credit(self, stream: Stream, chunks: int) -> None:
        stream.outstanding -= chunks
        slot = stream.slot
        if slot is not None and slot.tasks.get(stream.id) is stream and slot.conn is not None:
            now = time.monotonic()
            stream.progress_at = slot.busy_since = now  # the worker may go on from now
            slot.send(m.Kind.CREDIT, [stream.id], [chunks])

    def _on_stop_stream(self, stream: Stream) -> None:
        """Its reader has gone while it ran: the worker closes it at its next yield."""
        if stream.done():
            return
        self._cancel_in_worker(stream)
        self.counts.cancelled += 1
        settle(stream, exc=CancelledError())

    @staticmethod
    def _cancel_in_worker(stream: Stream) -> None:
        stream.abandoned = True  # shutdown does not wait for it
        slot = stream.slot
        if slot is not None and slot.tasks.get(stream.id) is stream and slot.conn is not None:
            slot.send(m.Kind.CANCEL, [stream.id])
