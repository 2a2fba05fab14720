"""SPool: the public face of the pool. The work happens in ``_dispatch.Dispatcher``."""

from __future__ import annotations

import asyncio
import atexit
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic

from . import _messages as m
from ._calls import (
    DEFAULT,
    CallOptions,
    Default,
    SpawnWithOptions,
    checked_context,
)
from ._config import PoolConfig, check_timeout
from ._dispatch import Dispatcher
from ._stats import PoolStats
from ._stream import AsyncChunkStream, ChunkStream
from ._stream_worker import defines_stream_step
from ._submission import Submission
from ._task import PoolFuture, on_dispatcher_thread, refuse_to_wait
from ._transport import make_transport
from ._waiting import Capacity, LoopBridge
from ._worker import ExecR, SpawnR, SWorker, defines_execute_batch
from .errors import PoolClosedError

_live_pools: weakref.WeakSet[SPool[Any, Any]] = weakref.WeakSet()
# Bound on how long interpreter exit waits for a pool its owner forgot to shut down.
_ATEXIT_TIMEOUT = 10.0
# How long a second Ctrl-C waits for the killed workers to be reaped.
_KILL_JOIN_TIMEOUT = 5.0


def _shutdown_forgotten_pools() -> None:
    for pool in list(_live_pools):
        pool.shutdown(wait=True, cancel_futures=True, timeout=_ATEXIT_TIMEOUT)


# Registered at import, after multiprocessing's own exit hook, so it runs first (atexit is
# LIFO): multiprocessing's hook would otherwise join our non-daemon workers forever.
atexit.register(_shutdown_forgotten_pools)


class SPool(Submission, Generic[SpawnR, ExecR]):
    """A pool of stateful worker processes: spawn each worker once, then execute many tasks.

    Args:
        worker_cls: an ``SWorker`` subclass, importable by the worker processes (define it at
            module level; with the default ``spawn`` start method, scripts need the
            ``if __name__ == "__main__":`` guard).
        queue_size: most tasks that may wait for a worker at once; ``None`` or ``0`` means
            unbounded. Running tasks do not count.
        submission_timeout: how long a submit waits for room in a full queue before raising
            ``QueueFullError``; ``None`` waits as long as it takes.
        execution_timeout: seconds from submission after which the task fails with
            ``TaskTimeoutError``. A task that had not started is removed and never runs; a
            running one finishes on its worker and its result is discarded.
        thread_pool: accepted for compatibility with stateful-pool 0.3.2 and not used: this
            pool parks no thread per task.
        mp_context: a ``multiprocessing`` context; default ``get_context("spawn")`` because
            CUDA cannot be initialised in a forked child.
        backend: ``"process"`` (default): workers are local processes. ``"ray"``: each worker
            is a Ray actor on the cluster at ``RAY_ADDRESS`` (a local Ray instance is started
            when it is unset and Ray is not initialised); needs ``pip install
            'stateful-pool[ray]'``.
        worker_options: default per-worker options of the backend; for Ray, actor options
            (``num_cpus``, ``num_gpus``, ``resources``, ``memory``, ``runtime_env``...) plus
            ``node_id`` to pin a worker to a node. ``pool.options(...)`` overrides them for
            one spawn.
        max_batch_size: with a worker that defines ``execute_batch``, hand up to this many
            queued tasks to one call. With one that defines ``stream_step``, run up to this
            many streams (and tasks) at once on one worker, new ones joining the running batch
            at its next step. ``1`` (default) turns batching off.
        max_batch_wait: seconds a partial batch may wait for more tasks, measured from the
            arrival of its oldest task. ``0`` (default) takes what is queued.
        spawn_timeout: seconds a worker's ``spawn`` may take before the process is killed and
            ``SpawnTimeoutError`` raised; ``None`` (default) waits.
        hang_timeout: opt-in: seconds a task (or batch) may run before its worker is killed and
            respawned; its tasks fail with ``WorkerCrashedError``. ``None`` (default) never
            kills.
        max_restarts: respawns allowed per worker within ``restart_window`` seconds after
            crashes; ``0`` turns respawning off, ``None`` means no limit. Default 5.
        restart_window: the window, in seconds, over which restarts are counted. Default 60.
        crash_loop_backoff: what a worker does once its restart budget is spent. ``None``
            (default): it is given up for good (state ``"dead"``). Seconds: it backs off that
            long (state ``"backing_off"``), then respawns; each further spent budget doubles
            the wait, up to ``crash_loop_max_delay``, and the doubling starts over after a
            whole ``restart_window`` without a respawn. Tasks queued meanwhile wait for it
            (give them a timeout). What a long-running server wants: a crash burst slows the
            respawns down but never leaves the slot empty for good.
        crash_loop_max_delay: the cap of that back-off, in seconds. Default 300.
        prefetch: opt-in, for micro-tasks: when every worker is busy and tasks still wait, a
            busy worker may be sent up to this many more tasks (or batches) to run next, which
            hides the round trip between tasks. It gives up strict work conservation: a task
            sent ahead waits behind its worker's current task even if another worker frees up
            first, and counts as running (it cannot be cancelled; its timeout says "while
            running"). Default 0: a worker holds only what it runs.
        restart_backoff: delay before the first respawn; it doubles with each further restart
            within the window, up to 10 s. Default 0.1 s.
        abort_grace: when a ``with`` / ``async with`` block is left by an exception
            (Ctrl-C's ``KeyboardInterrupt``, ``SystemExit``, any error), queued tasks are
            cancelled and running tasks get this many seconds before their workers are
            killed; the exception then propagates unchanged. Leaving normally waits for all
            accepted work. Default 1 s.
        first_chunk_timeout: seconds from a ``stream`` call to its first chunk; past it the
            stream ends with ``TaskTimeoutError`` (stopped in the worker if it runs).
            ``None`` (default): no limit. ``execution_timeout`` bounds a whole stream.
        chunk_timeout: seconds a running stream may go without a chunk (time its worker
            waits for a slow reader does not count); as ``first_chunk_timeout``.
        stream_buffer: most chunks of one stream that its reader has not consumed yet
            (buffered in the parent or held in the worker); the worker's generator pauses
            there until the reader catches up. Default 64.

    Raises:
        ValueError: an option is out of its range (nothing is spawned).
        TypeError: ``worker_cls`` is not an ``SWorker`` subclass.
    """

    def __init__(
        self,
        worker_cls: type[SWorker[SpawnR, ExecR]],
        queue_size: int | None = None,
        submission_timeout: float | None = None,
        execution_timeout: float | None = None,
        thread_pool: ThreadPoolExecutor | None = None,
        *,
        mp_context: Any = None,
        backend: str = "process",
        worker_options: dict[str, Any] | None = None,
        max_batch_size: int = 1,
        max_batch_wait: float = 0.0,
        spawn_timeout: float | None = None,
        hang_timeout: float | None = None,
        max_restarts: int | None = 5,
        prefetch: int = 0,
        restart_window: float = 60.0,
        restart_backoff: float = 0.1,
        abort_grace: float = 1.0,
        crash_loop_backoff: float | None = None,
        crash_loop_max_delay: float = 300.0,
        first_chunk_timeout: float | None = None,
        chunk_timeout: float | None = None,
        stream_buffer: int = 64,
    ) -> None:
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, SWorker)):
            raise TypeError(f"worker_cls must be a subclass of SWorker, got {worker_cls!r}")
        config = PoolConfig(queue_size, submission_timeout, execution_timeout, max_batch_size,
                            max_batch_wait, spawn_timeout, hang_timeout, max_restarts, prefetch,
                            restart_window, restart_backoff, abort_grace,
                            crash_loop_backoff, crash_loop_max_delay,
                            first_chunk_timeout=first_chunk_timeout,
                            chunk_timeout=chunk_timeout, stream_buffer=stream_buffer)
        self.abort_grace = abort_grace
        self._transport = make_transport(backend, mp_context)
        self.backend = backend
        self.worker_options = dict(worker_options or {})
        self._transport.check_options(self.worker_options)
        # A class that travels by value (notebook, python -c): the types defined beside it
        # must too, so its arguments are pickled with cloudpickle.
        self._dumps = self._transport.check_class(worker_cls)

        self.worker_cls = worker_cls
        self.queue_size = queue_size or None
        self.submission_timeout = submission_timeout
        self.execution_timeout = execution_timeout
        self.thread_pool = thread_pool
        self.first_chunk_timeout = first_chunk_timeout
        self.chunk_timeout = chunk_timeout
        self.stream_buffer = stream_buffer
        continuous = defines_stream_step(worker_cls)
        self.batching = (max_batch_size > 1 and defines_execute_batch(worker_cls)
                         and not continuous)
        self.max_batch_size = max_batch_size if self.batching else 1
        self.max_batch_wait = max_batch_wait if self.batching else 0.0
        self._capacity = Capacity(self.queue_size)
        self._ids = iter(range(1, 1 << 62)).__next__
        self._closed = False
        self._bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge] = (
            weakref.WeakKeyDictionary())
        self._dispatcher = Dispatcher(
            worker_cls, self._transport, config, self.batching,
            release_slot=self._capacity.release,
            # A Ray actor runs one stream at a time (see _ray.py).
            streams_per_worker=max_batch_size if continuous and backend == "process" else 1)
        # A pool dropped without shutdown() still stops its workers.
        finalizer = weakref.finalize(self, self._dispatcher.close, True, _ATEXIT_TIMEOUT)
        finalizer.atexit = False  # at exit, _shutdown_forgotten_pools does it and waits
        _live_pools.add(self)

    # ---- spawning ---------------------------------------------------------------------------

    def options(self, **worker_options: Any) -> SpawnWithOptions[SpawnR]:
        """Spawn with per-worker backend options, e.g. for Ray
        ``pool.options(num_gpus=1, node_id=node).spawn(model="vit")``.

        The options are merged over the pool's ``worker_options`` and kept for respawns.
        """
        merged = {**self.worker_options, **worker_options}
        self._transport.check_options(merged)
        return SpawnWithOptions(self, merged)

    def submit_spawn(self, *args: Any, **kwargs: Any) -> Future[SpawnR]:
        """Start one more worker process and run its ``spawn(*args, **kwargs)``.

        Returns:
            A future of what the worker's ``spawn`` returned. It fails with the exception
            ``spawn`` raised (worker traceback attached), ``SpawnError`` if the process died,
            or ``SpawnTimeoutError``; in each case no process is left behind.

        Raises:
            PoolClosedError: after ``shutdown()``.
            Exception: the arguments cannot be pickled (raised here, in the caller).
        """
        return self._submit_spawn(self.worker_options, args, kwargs)

    def _submit_spawn(self, options: dict[str, Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Future[SpawnR]:
        payload = (self._dumps or m.dumps)((args, kwargs), m.PROTOCOL)
        future: Future[SpawnR] = PoolFuture()
        future.set_running_or_notify_cancel()  # a spawn cannot be cancelled once submitted
        if self._closed or not self._dispatcher.add_worker(payload, future, options):
            raise PoolClosedError("cannot spawn: the pool is shut down")
        return future

    def spawn(self, *args: Any, **kwargs: Any) -> SpawnR:
        """Add a worker and wait until its ``spawn`` returned; return what it returned."""
        return SpawnWithOptions(self, self.worker_options).spawn(*args, **kwargs)

    async def async_spawn(self, *args: Any, **kwargs: Any) -> SpawnR:
        """``spawn`` for asyncio: awaits the worker without blocking the event loop."""
        return await SpawnWithOptions(self, self.worker_options).async_spawn(*args, **kwargs)

    # ---- executing --------------------------------------------------------------------------

    def with_context(self, context: Mapping[str, Any]) -> CallOptions[ExecR]:
        """This pool's execute methods with a context that travels to the worker with each
        task: in the worker, ``stateful_pool.current_contexts()`` returns it during
        ``execute`` (one per item during ``execute_batch``). For a request id in the worker's
        logs, or a trace context for its spans. It must pickle (``TypeError`` here if not).
        """
        return CallOptions(self, DEFAULT, checked_context(context))

    def with_timeout(self, seconds: float | None) -> CallOptions[ExecR]:
        """This pool's ``submit_execute`` / ``execute`` / ``async_execute`` with a timeout of
        their own instead of ``execution_timeout``: a request's deadline, for example
        ``pool.with_timeout(remaining).async_execute(item)``.

        The clock starts at each call; the time spent waiting for room in a full queue counts.
        A task whose timeout passes while queued leaves the queue and never runs (never in a
        batch); one that passes while it runs fails with ``TaskTimeoutError`` and its result is
        discarded. ``None``: no timeout.
        """
        check_timeout("timeout", seconds)
        return CallOptions(self, seconds, None)

    def submit_execute(self, *args: Any, **kwargs: Any) -> Future[ExecR]:
        """Queue one task; return at once with its future.

        Tasks start in submission order on whichever worker is free first.

        Returns:
            A ``concurrent.futures.Future`` of the task's result. ``future.cancel()`` removes
            a task that has not started.

        Raises:
            PoolClosedError: after ``shutdown()``.
            NoWorkersError: no worker is alive, starting or restarting.
            QueueFullError: ``queue_size`` tasks wait and no room came in time.
            TypeError: with batching on, anything but exactly one positional argument.
            Exception: the arguments cannot be pickled (raised here; the pool is unaffected).
        """
        return self._submit(args, kwargs, DEFAULT)

    def execute(self, *args: Any, **kwargs: Any) -> ExecR:
        """Run one task and wait for its result (``submit_execute(...).result()``).

        Raises:
            Exception: whatever the task raised in the worker (same type, worker traceback
                as ``__cause__``), or any error of ``submit_execute``, ``TaskTimeoutError``,
                ``WorkerCrashedError`` or ``RemoteError``.
        """
        if on_dispatcher_thread():  # before submitting: the task would run for nobody
            raise refuse_to_wait("pool.execute()")
        return self._execute(args, kwargs, DEFAULT)  # type: ignore[no-any-return]

    async def async_execute(self, *args: Any, **kwargs: Any) -> ExecR:
        """Run one task from asyncio. No thread waits for it: the event loop is woken when
        the result arrives. Cancelling the awaiting task before the task starts removes it
        from the queue; once it runs, the pool stops waiting for it (``shutdown`` will not).
        Raises as ``execute`` does; a full queue is waited on asynchronously.
        """
        return await self._async_execute(args, kwargs, DEFAULT)  # type: ignore[no-any-return]

    def stream(self, *args: Any, **kwargs: Any) -> ChunkStream[Any]:
        """Run one streaming task: the worker's ``execute`` yields chunks (or its
        ``stream_step`` returns them); iterate what this returns to get them, in order, as
        they come: ``for chunk in pool.stream(prompt): ...``.

        The task is submitted at once, like ``submit_execute``. Leaving the loop early
        (``break``, an exception), ``close()`` or dropping the iterator stops the stream in
        the worker at its next yield (the generator is closed: its ``finally`` runs), and the
        worker takes other work at once.

        Raises:
            Exception: as ``submit_execute``, at the call; during iteration, after the chunks
                delivered, what ended the stream early (the generator's exception with the
                worker's traceback, ``WorkerCrashedError``, ``TaskTimeoutError`` for
                ``execution_timeout`` / ``first_chunk_timeout`` / ``chunk_timeout``,
                ``RemoteError`` for a chunk that could not be pickled).
        """
        return CallOptions(self, DEFAULT, None).stream(*args, **kwargs)

    def async_stream(self, *args: Any, **kwargs: Any) -> AsyncChunkStream[Any]:
        """``stream`` for asyncio: ``async for chunk in pool.async_stream(prompt): ...``.

        The arguments are pickled at the call; the task is submitted at the first
        ``__anext__``. Cancelling the task that awaits a chunk stops the stream in the
        worker, as leaving the loop does.
        """
        return CallOptions(self, DEFAULT, None).async_stream(*args, **kwargs)

    def with_stream_timeouts(self, *, first_chunk_timeout: float | None | Default = DEFAULT,
                             chunk_timeout: float | None | Default = DEFAULT
                             ) -> CallOptions[ExecR]:
        """This pool's ``stream`` / ``async_stream`` with time limits of their own instead of
        the pool's ``first_chunk_timeout`` / ``chunk_timeout`` (``None``: no limit)."""
        return CallOptions(self, DEFAULT, None).with_stream_timeouts(
            first_chunk_timeout=first_chunk_timeout, chunk_timeout=chunk_timeout)

    # ---- lifecycle --------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 timeout: float | None = None) -> None:
        """Stop accepting tasks, finish the accepted ones, stop every worker. Idempotent.

        It waits for queued tasks (unless ``cancel_futures``) and for running tasks that a
        caller still waits for. A running task whose caller has gone (its
        ``execution_timeout`` passed, or its asyncio caller was cancelled) is not waited for:
        its worker is terminated. Idle workers run their ``close()`` and exit at once.

        Args:
            wait: block until every worker process has exited.
            cancel_futures: cancel the tasks that have not started instead of running them.
            timeout: seconds to wait for accepted tasks; past it, running tasks fail with
                ``PoolClosedError`` and their workers are killed, and queued ones are
                cancelled. ``None``: no limit.

        A ``KeyboardInterrupt`` (Ctrl-C) while it waits kills every worker at once and
        propagates. Afterwards every future of this pool is done and no worker process
        remains. Safe from ``atexit``, from a signal handler's thread and from the event
        loop's thread (it never waits on the loop).
        """
        self._closed = True
        self._dispatcher.close(cancel_futures, timeout)
        _live_pools.discard(self)
        if wait:
            try:
                self._dispatcher.join()
            except KeyboardInterrupt:
                self._kill_now()
                raise

    def _kill_now(self) -> None:
        """Stop every worker at once (SIGKILL) and wait the few milliseconds that takes."""
        self._closed = True
        self._dispatcher.close(True, 0.0, kill=True)
        self._dispatcher.join(timeout=_KILL_JOIN_TIMEOUT)

    def _abort(self) -> None:
        """Leave a ``with`` block on an exception: cancel the queue, give running tasks
        ``abort_grace`` seconds, stop the workers."""
        self.shutdown(cancel_futures=True, timeout=self.abort_grace)

    def __enter__(self) -> SPool[SpawnR, ExecR]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self._abort()

    async def __aenter__(self) -> SPool[SpawnR, ExecR]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        stop = self.shutdown if exc_type is None else self._abort
        try:
            await asyncio.get_running_loop().run_in_executor(None, stop)
        except BaseException:  # cancelled again (a second Ctrl-C under asyncio.run)
            self._kill_now()
            raise

    # ---- introspection ----------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A consistent-enough snapshot of workers, queue and counters (cheap; no I/O)."""
        return self._dispatcher.snapshot()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else "open"
        return (f"<SPool {self.worker_cls.__qualname__} {state} workers={s.live_workers} "
                f"busy={s.busy_workers} queued={s.queue_depth} in_flight={s.in_flight}>")


SPool.__module__ = "stateful_pool"
