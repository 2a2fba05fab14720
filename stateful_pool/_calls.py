"""What ``pool.with_timeout(...)``, ``pool.with_context(...)`` and ``pool.options(...)``
return: the pool's execute (or spawn) methods with something of their own bound."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic

from . import _messages as m
from ._config import check_timeout
from ._stream import AsyncChunkStream, ChunkStream
from ._task import on_dispatcher_thread, refuse_to_wait
from ._worker import ExecR, SpawnR

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._pool import SPool


class Default:
    """Marks "the pool's execution_timeout" (``None`` means no timeout)."""


DEFAULT = Default()

# A stream's (first_chunk_timeout, chunk_timeout): seconds, None (no limit) or the pool's.
StreamTimeouts = tuple[float | None | Default, float | None | Default]
STREAM_DEFAULTS: StreamTimeouts = (DEFAULT, DEFAULT)


class CallOptions(Generic[ExecR]):
    """What ``pool.with_timeout(...)``, ``pool.with_context(...)`` and
    ``pool.with_stream_timeouts(...)`` return: the execute and stream methods with a timeout,
    a context and/or stream time limits of their own. Chainable:
    ``pool.with_timeout(2.0).with_context({"request_id": rid}).async_execute(x)``."""

    def __init__(self, pool: SPool[Any, ExecR], timeout: float | None | Default,
                 context: dict[str, Any] | None,
                 stream_timeouts: StreamTimeouts = STREAM_DEFAULTS) -> None:
        self._pool = pool
        self._timeout = timeout
        self._context = context
        self._stream_timeouts = stream_timeouts

    def with_timeout(self, seconds: float | None) -> CallOptions[ExecR]:
        check_timeout("timeout", seconds)
        return CallOptions(self._pool, seconds, self._context, self._stream_timeouts)

    def with_context(self, context: Mapping[str, Any]) -> CallOptions[ExecR]:
        return CallOptions(self._pool, self._timeout, checked_context(context),
                           self._stream_timeouts)

    def with_stream_timeouts(self, *, first_chunk_timeout: float | None | Default = DEFAULT,
                             chunk_timeout: float | None | Default = DEFAULT
                             ) -> CallOptions[ExecR]:
        for name, value in (("first_chunk_timeout", first_chunk_timeout),
                            ("chunk_timeout", chunk_timeout)):
            if not isinstance(value, Default):
                check_timeout(name, value)
        return CallOptions(self._pool, self._timeout, self._context,
                           (first_chunk_timeout, chunk_timeout))

    def stream(self, *args: Any, **kwargs: Any) -> ChunkStream[Any]:
        task = self._pool._submit(args, kwargs, self._timeout, self._context,
                                  self._stream_timeouts)
        return ChunkStream(task)  # type: ignore[arg-type]

    def async_stream(self, *args: Any, **kwargs: Any) -> AsyncChunkStream[Any]:
        pool = self._pool
        payload = pool._payload(args, kwargs, stream=True)
        return AsyncChunkStream(
            lambda: pool._async_submit(payload, self._timeout, self._context,
                                       self._stream_timeouts),
            pool._bridge)

    def submit_execute(self, *args: Any, **kwargs: Any) -> Future[ExecR]:
        return self._pool._submit(args, kwargs, self._timeout, self._context)

    def execute(self, *args: Any, **kwargs: Any) -> ExecR:
        if on_dispatcher_thread():
            raise refuse_to_wait("pool.execute()")
        return self._pool._execute(  # type: ignore[no-any-return]
            args, kwargs, self._timeout, self._context)

    async def async_execute(self, *args: Any, **kwargs: Any) -> ExecR:
        return await self._pool._async_execute(  # type: ignore[no-any-return]
            args, kwargs, self._timeout, self._context)


_PLAIN = frozenset({str, int, float, bool, type(None)})


def checked_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict that pickles (checked here, in the caller, like arguments)."""
    context = dict(context)
    if all(type(v) in _PLAIN for v in context.values()):
        return context  # the usual request id / traceparent: nothing to check (hot path)
    try:
        m.dumps(context, m.PROTOCOL)
    except Exception as exc:
        raise TypeError(f"a task context must pickle: {exc!r}") from exc
    return context


class SpawnWithOptions(Generic[SpawnR]):
    """What ``pool.options(...)`` returns: the spawn methods, with backend options bound."""

    def __init__(self, pool: SPool[SpawnR, Any], options: dict[str, Any]) -> None:
        self._pool = pool
        self._options = options

    def submit_spawn(self, *args: Any, **kwargs: Any) -> Future[SpawnR]:
        return self._pool._submit_spawn(self._options, args, kwargs)

    def spawn(self, *args: Any, **kwargs: Any) -> SpawnR:
        if on_dispatcher_thread():
            raise refuse_to_wait("pool.spawn()")
        return self.submit_spawn(*args, **kwargs).result()

    async def async_spawn(self, *args: Any, **kwargs: Any) -> SpawnR:
        return await asyncio.wrap_future(self.submit_spawn(*args, **kwargs))
