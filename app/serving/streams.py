"""An answer that streams: the chunks of one request's pool stream, as a protocol relays them.

``ServingCore.stream`` opens the pool stream and waits for its first chunk: anything that
goes wrong until then is a ``ServingError`` like any refusal (the protocol has sent nothing
yet). It returns an ``OpenStream``, which the protocol iterates and relays::

    core.stream(model, value, lifetime)     503 / 504 / 400 / 500 / 499, nothing sent yet
        -> OpenStream                         the first chunk is in hand
    async for item in open_stream:            chunks, validated against chunk_model
        a chunk         -> the protocol sends it (an SSE event...)
        a ServingError  -> the last item: the stream failed after its first chunk (a crash,
                           a time limit, an error in the worker); the status has gone out, so
                           the protocol renders it in-stream (an error event)
    open_stream.aclose()                      always (``async with``): stops the stream in the
                                              worker if it still runs, records the metrics

One watch on the client's connection covers the stream's whole life, from the submission to
the last chunk: when the client leaves, the stream is stopped in the worker at its next yield
(or withdrawn from the queue), and iteration ends (``client_left``). The watch wakes the
reader by cancelling it while it waits for a chunk, so a stream costs one extra task, not one
per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from stateful_pool import AsyncChunkStream

from .errors import ServingError
from .lifetime import ClientDisconnected, Lifetime

logger = logging.getLogger("app.lifetime")

# What an exception that ended a stream becomes (``ServingCore``'s mapping), given whether
# the first chunk had come; None for an exception the server does not know (a bug).
Refusal = Callable[[BaseException, bool], ServingError | None]


class OpenStream:
    """A streaming answer under way; iterate it with ``async for`` (module docstring).

    Attributes:
        chunks: chunks handed to the protocol so far.
        started: its first chunk came, or it ended without one (``open`` returned).
        client_left: the client closed the connection before the stream ended.
        error: what ended the stream early (the last item the protocol got), else None.
        first_chunk_s: seconds from the request's arrival to its first chunk (None: none).
        lifetime: the request's deadline and disconnect watch.
    """

    def __init__(self, source: AsyncChunkStream[Any], lifetime: Lifetime,
                 chunk_adapter: TypeAdapter[Any], refusal: Refusal,
                 on_close: Callable[[OpenStream], None]) -> None:
        self._source = source
        self.lifetime = lifetime
        self._adapter = chunk_adapter
        self._refusal = refusal
        self._on_close = on_close
        self._first: list[Any] = []
        self._reader: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Future[Any] | None = None
        self._ended = False
        self._closed = False
        self.chunks = 0
        self.started = False
        self.client_left = False
        self.error: ServingError | None = None
        self.first_chunk_s: float | None = None

    # ---- opening: the core waits for the first chunk ------------------------------------

    async def open(self) -> None:
        """Wait for the first chunk (or the stream's end without one).

        Raises:
            ServingError: the stream failed before its first chunk; it has been closed.
            ClientDisconnected: the client left first; the stream was stopped or withdrawn.
        """
        self._watch()
        try:
            chunk = await self._pull()
        except BaseException as exc:
            self._ended = True
            self.close()
            if isinstance(exc, ClientDisconnected | asyncio.CancelledError):
                raise
            error = self._refusal(exc, False)
            if error is None:
                raise
            raise error from None
        self.started = True
        if chunk is not _END:
            self.first_chunk_s = time.monotonic() - self.lifetime.received_at
            self._first.append(chunk)
        else:
            self._ended = True

    # ---- relaying: the protocol iterates ------------------------------------------------

    def __aiter__(self) -> OpenStream:
        return self

    async def __anext__(self) -> Any:
        if self._first:
            self.chunks += 1
            return self._first.pop()
        if self._ended or self.client_left:
            raise StopAsyncIteration
        try:
            chunk = await self._pull()
        except ClientDisconnected:
            self._ended = True
            raise StopAsyncIteration from None
        except Exception as exc:
            self._ended = True
            self.error = self._refusal(exc, True) or self._unknown(exc)
            self.close()
            return self.error
        if chunk is _END:
            self._ended = True
            raise StopAsyncIteration
        self.chunks += 1
        return chunk

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> OpenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the stream in the worker if it still runs; end the connection watch."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.remove_done_callback(self._client_gone)
            self._watcher.cancel()
        self._source.close()
        self._on_close(self)

    # ---- inside -----------------------------------------------------------------------------

    async def _pull(self) -> Any:
        """The next chunk, validated, or ``_END``; ClientDisconnected when the client left."""
        if self.client_left:
            raise ClientDisconnected
        self._reader = asyncio.current_task()
        try:
            raw = await self._source.__anext__()
        except StopAsyncIteration:
            return _END
        except asyncio.CancelledError:
            if not self.client_left:
                raise
            assert self._reader is not None
            self._reader.uncancel()
            raise ClientDisconnected from None
        finally:
            self._reader = None
        try:
            return self._adapter.validate_python(raw)
        except ValidationError as exc:
            raise ChunkMismatch(exc) from None

    def _watch(self) -> None:
        gone = self.lifetime.client_gone
        if gone is not None:
            self._watcher = asyncio.ensure_future(gone())
            self._watcher.add_done_callback(self._client_gone)

    def _client_gone(self, watcher: asyncio.Future[Any]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        self.client_left = True
        if self._reader is not None:
            self._reader.cancel()  # it stops the stream as it leaves the library's wait
        else:
            self._source.close()  # the protocol is sending: stop the worker now

    @staticmethod
    def _unknown(exc: BaseException) -> ServingError:
        logger.error("a stream failed after its first chunk", exc_info=exc)
        return ServingError(500, "internal error in the model worker")


class ChunkMismatch(Exception):
    """The worker yielded a chunk that does not match its ``chunk_model``."""

    def __init__(self, exc: ValidationError) -> None:
        super().__init__(f"the model wrote a chunk that does not match its chunk_model: "
                         f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}")


_END = object()
