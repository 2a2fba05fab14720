"""How a call becomes a task on the dispatcher's queue: arguments pickled in the caller, a
deadline, a place in ``queue_size``, the fast path to an idle worker. ``SPool``'s base."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from . import _messages as m
from ._calls import Default, StreamTimeouts
from ._dispatch import Dispatcher, Lent
from ._drive import NEEDS_ROOM, PLACED
from ._stream import Stream
from ._task import LoopTask, Task, ThreadTask
from ._waiting import Capacity, LoopBridge
from .errors import NoWorkersError, PoolClosedError

_running_loop = asyncio._get_running_loop  # the running loop of this thread, or None


class Submission:
    # Provided by SPool.
    _closed: bool
    _dumps: Any
    _dispatcher: Dispatcher
    _capacity: Capacity
    _bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge]
    _ids: Any
    batching: bool
    queue_size: int | None
    submission_timeout: float | None
    execution_timeout: float | None
    first_chunk_timeout: float | None
    chunk_timeout: float | None
    stream_buffer: int

    def _payload(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                 stream: bool = False) -> m.Payload:
        if self._closed:
            raise PoolClosedError("cannot execute: the pool is shut down")
        if self.batching and not stream:
            if len(args) != 1 or kwargs:
                raise TypeError(
                    "with batching on (max_batch_size > 1), execute takes exactly one "
                    f"positional argument, got {len(args)} positional and "
                    f"{len(kwargs)} keyword arguments")
            payload = m.dumps_payload(args[0], self._dumps)
        else:
            payload = m.dumps_payload((args, kwargs), self._dumps)
        if not self._dispatcher.has_live_worker():
            raise NoWorkersError("cannot execute: the pool has no live worker; call spawn() first")
        return payload

    @property
    def _take_room(self) -> Any:
        """Takes a place in ``queue_size`` if one is free now (None: no limit)."""
        return None if self.queue_size is None else self._capacity.try_take

    def _enqueue(self, task: Task) -> Task:
        task.holds_slot = self.queue_size is not None
        if self._closed or not self._dispatcher.submit(task):
            if task.holds_slot:
                self._capacity.release(task)
            raise PoolClosedError("cannot execute: the pool is shut down")
        return task

    def _deadline(self, timeout: float | None | Default) -> float | None:
        if isinstance(timeout, Default):
            timeout = self.execution_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _new_task(self, payload: m.Payload, deadline: float | None,
                  context: dict[str, Any] | None, stream: StreamTimeouts | None) -> Task:
        if stream is None:
            return Task(self._ids(), payload, deadline, False, self._on_cancel, context)
        first, gap = stream
        dispatcher = self._dispatcher
        return Stream(self._ids(), payload, deadline, self._on_cancel, context,
                      self.stream_buffer,
                      self.first_chunk_timeout if isinstance(first, Default) else first,
                      self.chunk_timeout if isinstance(gap, Default) else gap,
                      dispatcher.credit, dispatcher.stop_stream)

    def _submit(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None | Default, context: dict[str, Any] | None = None,
                stream: StreamTimeouts | None = None) -> Task:
        payload = self._payload(args, kwargs, stream is not None)
        deadline = self._deadline(timeout)
        task = self._new_task(payload, deadline, context, stream)
        if stream is None and _running_loop() is not None and (
                self._dispatcher.submit_from_loop(task, self._bridge(), self._take_room)
                == PLACED):
            return task  # from a coroutine: that loop drives the pool (_drive)
        if self._dispatcher.try_run_now(task):  # a worker was idle: it has the task already
            return task
        if self.queue_size is not None:
            self._capacity.admit(self.submission_timeout, deadline)
        return self._enqueue(task)

    def _execute(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                 timeout: float | None | Default, context: dict[str, Any] | None = None) -> Any:
        """``execute``: on an idle worker, this thread reads the answer from the worker's pipe
        itself (no hop through the dispatcher thread); otherwise it queues and waits."""
        payload = self._payload(args, kwargs)
        deadline = self._deadline(timeout)
        task = ThreadTask(self._ids(), payload, deadline, self._on_cancel, context)
        loop = _running_loop()
        if loop is not None:  # a blocking call in a coroutine: this loop stops reading the
            self._dispatcher.leave_loop(loop)  # pipes meanwhile
        lent = self._dispatcher.try_run_now(task, lend=True)
        if type(lent) is Lent:
            self._dispatcher.wait_lent(lent)
        elif not lent:
            if self.queue_size is not None:
                self._capacity.admit(self.submission_timeout, deadline)
            self._enqueue(task)
        return task.result()

    def _bridge(self) -> LoopBridge:
        """The result bridge of the running event loop."""
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = LoopBridge(loop)
        return bridge

    async def _async_submit(self, payload: m.Payload, timeout: float | None | Default,
                            context: dict[str, Any] | None,
                            stream: StreamTimeouts | None = None) -> Task:
        deadline = self._deadline(timeout)
        task = self._new_task(payload, deadline, context, stream)
        if not self._dispatcher.try_run_now(task):
            if self.queue_size is not None:
                await self._capacity.admit_async(self.submission_timeout, deadline,
                                                 self._bridge())
            self._enqueue(task)
        return task

    async def _async_execute(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                             timeout: float | None | Default,
                             context: dict[str, Any] | None = None) -> Any:
        payload = self._payload(args, kwargs)
        bridge = self._bridge()
        if not bridge.reads_pipes:
            task = await self._async_submit(payload, timeout, context)
            return await self._await_task(bridge, task)
        dispatcher = self._dispatcher
        deadline = self._deadline(timeout)
        task = LoopTask(self._ids(), payload, deadline, self._on_cancel, context,
                        bridge.loop().create_future(), bridge)
        # The loop that drives the pool queues, dispatches and reads answers itself (_drive).
        placed = dispatcher.submit_from_loop(task, bridge, self._take_room)
        if placed == NEEDS_ROOM:
            await self._capacity.admit_async(self.submission_timeout, deadline, bridge)
            task.holds_slot = True
            if dispatcher.submit_from_loop(task, bridge, None) != PLACED:
                self._enqueue(task)
            return await self._await_task(bridge, task)
        if placed == PLACED:
            return await self._await_task(bridge, task)
        # Another loop drives (or none may): on an idle worker, this loop still reads the
        # answer from the worker's pipe itself, for this one task.
        lent = dispatcher.try_run_now(task, lend=True)
        if type(lent) is not Lent:
            if not lent:
                if self.queue_size is not None:
                    await self._capacity.admit_async(self.submission_timeout, deadline, bridge)
                self._enqueue(task)
            return await self._await_task(bridge, task)
        reader = bridge.read_lent(lent, dispatcher.reclaim)
        if reader is None:
            dispatcher.reclaim(lent, False)
            return await self._await_task(bridge, task)
        try:
            return await self._await_task(bridge, task)
        finally:
            bridge.end_lent(reader, lent)
            dispatcher.reclaim(lent, False)  # (nothing to do if the answer was read)

    async def _await_task(self, bridge: LoopBridge, task: Task) -> Any:
        try:
            if type(task) is LoopTask:
                return await task.waiter
            return await bridge.watch(task)
        except asyncio.CancelledError:
            if not task.cancel():  # queued: it leaves the queue and never runs
                self._dispatcher.abandoned(task)  # running: shutdown will not wait for it
            raise

    def _on_cancel(self, task: Task) -> None:
        if task.holds_slot:
            self._capacity.release(task)
        self._dispatcher.cancelled(task)
