"""What ``pool.with_timeout(...)``, ``pool.with_context(...)`` and ``pool.options(...)``
return: the pool's execute (or spawn) methods with something of their own bound."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic

from . import _messages as m
from ._config import check_timeout
from ._task import on_dispatcher_thread, refuse_to_wait
from ._worker import ExecR, SpawnR

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._pool import SPool


class Default:
    """Marks "the pool's execution_timeout" (``None`` means no timeout)."""


DEFAULT = Default()


class CallOptions(Generic[ExecR]):
    """What ``pool.with_timeout(...)`` and ``pool.with_context(...)`` return: the execute
    methods with a timeout and/or a context of their own. Chainable:
    ``pool.with_timeout(2.0).with_context({"request_id": rid}).async_execute(x)``."""

    def __init__(self, pool: SPool[Any, ExecR], timeout: float | None | Default,
                 context: dict[str, Any] | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._context = context

    def with_timeout(self, seconds: float | None) -> CallOptions[ExecR]:
        check_timeout("timeout", seconds)
        return CallOptions(self._pool, seconds, self._context)

    def with_context(self, context: Mapping[str, Any]) -> CallOptions[ExecR]:
        return CallOptions(self._pool, self._timeout, checked_context(context))

    def submit_execute(self, *args: Any, **kwargs: Any) -> Future[ExecR]:
        return self._pool._submit(args, kwargs, self._timeout, self._context)

    def execute(self, *args: Any, **kwargs: Any) -> ExecR:
        if on_dispatcher_thread():
            raise refuse_to_wait("pool.execute()")
        return self.submit_execute(*args, **kwargs).result()

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
