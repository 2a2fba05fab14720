"""A stream in the parent: the task whose result comes as chunks, and its two readers.

The dispatcher thread appends each group of chunks the worker sends (``on_chunks``) and
wakes the reader only if it waits; the reader takes everything buffered at once, so chunks
that arrive faster than it reads cost one wakeup per group, not per chunk. Chunks stay pickled
until the reader takes them: unpickling is the reader's work, not the dispatcher's.

Flow control is by credit: the worker may have at most ``window`` chunks that the reader has
not consumed (sent or held back); it pauses its generator there. The reader returns credit
as it consumes (when it runs out of chunks in hand, or every ``window // 2``), through the
dispatcher, so the parent holds at most ``window`` chunks of one stream, however slow the
reader.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _messages as m
from ._outcomes import rebuild_value
from ._task import Task

if TYPE_CHECKING:
    from ._slot import WorkerSlot
    from ._waiting import LoopBridge

C = TypeVar("C")


class Stream(Task):
    """One stream task; its future resolves (``None`` or the error) when the stream ends.

    The dispatcher thread calls ``on_chunks`` and the timer methods; the reader calls
    ``take`` / ``wait`` / ``credit`` / ``stop``.
    """

    is_stream = True

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 on_cancel: Callable[[Task], None], context: dict[str, Any] | None,
                 window: int, first_chunk_timeout: float | None, chunk_timeout: float | None,
                 on_credit: Callable[[Stream, int], None], on_stop: Callable[[Stream], None]
                 ) -> None:
        super().__init__(task_id, payload, None, False, on_cancel, context)
        self.window = window
        self.on_credit = on_credit
        self.on_stop = on_stop
        self._lock = threading.Lock()
        self._chunks: deque[m.Payload] = deque()
        self._waiter: Any = None  # a held threading.Lock, or (bridge, asyncio future)
        # The dispatcher thread's view.
        self.slot: WorkerSlot | None = None  # the worker running it
        self.outstanding = 0  # chunks received and not yet credited back by the reader
        self.chunks_received = 0
        self.total_deadline = deadline
        self.first_chunk_timeout = first_chunk_timeout
        self.chunk_timeout = chunk_timeout
        self.progress_at = self.submitted_at
        self.deadline = self.next_due()
        self.add_done_callback(_wake_reader)

    # ---- the dispatcher thread ----------------------------------------------------------

    @property
    def paused(self) -> bool:
        """The worker waits for the reader: it holds ``window`` unconsumed chunks."""
        return self.outstanding >= self.window

    def next_due(self) -> float | None:
        """When a time limit of this stream falls next (``None``: it has none)."""
        dues = []
        if self.total_deadline is not None:
            dues.append(self.total_deadline)
        if self.chunks_received == 0:
            if self.first_chunk_timeout is not None:
                dues.append(self.submitted_at + self.first_chunk_timeout)
        elif self.chunk_timeout is not None:
            dues.append(self.progress_at + self.chunk_timeout)
        return min(dues) if dues else None

    def overdue(self, now: float) -> str | None:
        """Which limit has passed at ``now``, in words; ``None`` if none has."""
        if self.total_deadline is not None and self.total_deadline <= now:
            return "timed out"
        if self.chunks_received == 0:
            limit = self.first_chunk_timeout
            if limit is not None and self.submitted_at + limit <= now:
                return f"got no first chunk within first_chunk_timeout={limit} s"
        elif self.chunk_timeout is not None and self.progress_at + self.chunk_timeout <= now:
            return f"got no chunk for chunk_timeout={self.chunk_timeout} s"
        return None

    def on_chunks(self, blobs: list[m.Payload], now: float) -> None:
        n = len(blobs)
        self.outstanding += n
        self.chunks_received += n
        self.progress_at = now
        with self._lock:
            self._chunks.extend(blobs)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)

    # ---- the reader -----------------------------------------------------------------------

    def take(self) -> list[m.Payload]:
        """Every chunk buffered now (maybe none)."""
        with self._lock:
            chunks = list(self._chunks)
            self._chunks.clear()
        return chunks

    def wait(self) -> list[m.Payload]:
        """Chunks, waiting for some if none is buffered; ``[]`` once the stream has ended."""
        with self._lock:
            if not self._chunks and not self.done():
                waiter = threading.Lock()
                waiter.acquire()
                self._waiter = waiter
            else:
                waiter = None
        if waiter is not None:
            waiter.acquire()
        return self.take()

    async def wait_async(self, bridge: LoopBridge) -> list[m.Payload]:
        """``wait`` for a coroutine; cancelling it stops the stream."""
        with self._lock:
            if not self._chunks and not self.done():
                future = asyncio.get_running_loop().create_future()
                self._waiter = (bridge, future)
            else:
                future = None
        if future is not None:
            try:
                await future
            except asyncio.CancelledError:
                self.stop()
                raise
        return self.take()

    def credit(self, n: int) -> None:
        """The reader consumed ``n`` chunks: the worker may send that many more."""
        if n and not self.done():
            self.on_credit(self, n)

    def stop(self) -> None:
        """The reader is gone: a queued stream never runs, a running one is stopped in the
        worker at its next yield."""
        if self.done() or self.cancel():
            return
        self.on_stop(self)

    def end_error(self) -> BaseException | None:
        """What the reader raises after the last chunk (``None``: a normal end)."""
        if self.cancelled():
            return CancelledError()
        return self.exception()


def _wake(waiter: Any) -> None:
    if type(waiter) is tuple:
        bridge, future = waiter
        try:
            bridge.call(_resolve, future)
        except RuntimeError:
            pass  # its event loop is closed: nobody reads any more
    else:
        waiter.release()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake_reader(stream: Any) -> None:
    with stream._lock:
        waiter, stream._waiter = stream._waiter, None
    if waiter is not None:
        _wake(waiter)


class _Reader:
    """What both readers share: chunks in hand, credit, unpickling."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._hand: deque[m.Payload] = deque()
        self._consumed = 0  # since the last credit
        self._half = max(1, stream.window // 2)
        self._ended = False

    def _next_from_hand(self) -> Any:
        blob = self._hand.popleft()
        self._consumed += 1
        if self._consumed >= self._half:
            self._give_credit()
        ok, value = rebuild_value("chunk", blob, "chunk")
        if not ok:
            self._end()
            raise value
        return value

    def _give_credit(self) -> None:
        n, self._consumed = self._consumed, 0
        self._stream.credit(n)

    def _finish(self) -> None:
        """Nothing more will come: raise the stream's error or stop iterating."""
        self._ended = True
        error = self._stream.end_error()
        if error is not None:
            raise error

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._hand.clear()
            self._stream.stop()


class ChunkStream(_Reader, Generic[C], Iterator[C]):
    """What ``pool.stream(...)`` returns: iterate it for the chunks, in order.

    Leaving the loop early (``break``, an exception), ``close()``, leaving a ``with`` block or
    dropping the object stops the stream in the worker at its next yield. After the chunks
    delivered, iteration raises what ended the stream early: the generator's own exception
    (worker traceback attached), ``WorkerCrashedError``, ``TaskTimeoutError``...
    """

    def __iter__(self) -> ChunkStream[C]:
        return self

    def __next__(self) -> C:
        if self._hand:
            return self._next_from_hand()  # type: ignore[no-any-return]
        if self._ended:
            raise StopIteration
        if self._consumed:
            self._give_credit()  # about to wait: the worker may send at once again
        self._hand.extend(self._stream.wait())
        if not self._hand:
            self._finish()
            raise StopIteration
        return self._next_from_hand()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the stream (the worker closes its generator at its next yield)."""
        self._end()

    def __enter__(self) -> ChunkStream[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end()

    def __del__(self) -> None:
        if not self._ended:
            self._end()


class AsyncChunkStream(_Reader, Generic[C], AsyncIterator[C]):
    """What ``pool.async_stream(...)`` returns: ``async for`` it. The stream is submitted at
    the first ``__anext__``. Cancelling the task that awaits it, leaving the loop early,
    ``aclose()`` or dropping it stops the stream in the worker at its next yield."""

    def __init__(self, start: Callable[[], Any], bridge: Callable[[], LoopBridge]) -> None:
        self._start: Callable[[], Any] | None = start
        self._bridge = bridge
        self._hand = deque()
        self._consumed = 0
        self._ended = False

    def __aiter__(self) -> AsyncChunkStream[C]:
        return self

    async def __anext__(self) -> C:
        if self._start is not None:
            start, self._start = self._start, None
            _Reader.__init__(self, await start())
        if self._hand:
            return self._next_from_hand()  # type: ignore[no-any-return]
        if self._ended:
            raise StopAsyncIteration
        if self._consumed:
            self._give_credit()
        self._hand.extend(await self._stream.wait_async(self._bridge()))
        if not self._hand:
            self._finish()
            raise StopAsyncIteration
        return self._next_from_hand()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._start = None
        if hasattr(self, "_stream"):
            self._end()
        self._ended = True

    async def __aenter__(self) -> AsyncChunkStream[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._ended:
            self.close()
