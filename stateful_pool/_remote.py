"""Pools served to other processes of the same machine over a Unix socket.

``PoolServer`` serves one or more named ``SPool``s on a socket path; ``PoolClient`` connects
to it and hands out ``RemotePool``s, which call like an ``SPool``: ``execute``,
``submit_execute``, ``async_execute``, ``stream``, ``async_stream``, ``with_timeout``,
``with_context``, ``with_stream_timeouts`` and ``stats()``. Several processes (an HTTP
front end per core) thereby share one set of workers: a GPU's requests still meet in one
batch, and no worker idles while another has a queue, whatever process a request came in by.

Wire: frames of a 4-byte big-endian length and a pickle. A frame holds every message that
was ready when its writer got round to it (a list of tuples), so a busy connection costs one
write and one read per batch of tasks, not per task. Arguments are pickled in the caller
(bad ones raise there), results and exceptions in the server, each on its own, so that one
that cannot cross fails its own task only. Each side's socket is read by an asyncio event
loop: a client made with ``await PoolClient.connect_async(...)`` uses the caller's loop (an
HTTP server's: results reach their awaiting coroutines with no thread hop), one made with
``PoolClient.connect(...)`` runs a loop in a thread of its own; both serve threads and other
event loops too.

Security: the socket is for processes of the same user. The server checks the peer's uid
(``SO_PEERCRED``) and an auth key sent before anything is unpickled; keep the socket in a
directory only the user can enter (``PoolServer`` creates the socket with mode 0600).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import pickle
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, TypeVar

from ._config import check_timeout
from ._outcomes import RemoteTraceback, type_name
from ._stats import PoolStats
from .errors import PoolClosedError, PoolError, RemoteError

__all__ = ["PoolClient", "PoolServer", "RemotePool", "ServerGoneError"]

C = TypeVar("C")

_HEADER = struct.Struct(">I")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Chunks a stream may have sent to a client that its reader has not consumed yet; past it the
# server stops taking the pool stream's chunks (the pool then pauses the worker's generator).
_STREAM_WINDOW = 64
_CONNECT_TIMEOUT = 5.0


class ServerGoneError(PoolError, ConnectionError):
    """The pool server could not be reached, or its connection was lost.

    Tasks in flight when the connection was lost get it: whether they ran is unknown. New
    calls get it at once until the client has connected again (it retries by itself).
    """


class _Default:
    """Marks "the served pool's own limit"."""


_DEFAULT = _Default()
Timeout = float | None | _Default


def _frame(messages: list[Any]) -> bytes:
    data = pickle.dumps(messages, _PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _split_frames(buffer: bytearray) -> list[bytes]:
    """Take every complete frame off the front of ``buffer``."""
    frames = []
    start = 0
    end = len(buffer)
    while end - start >= 4:
        (size,) = _HEADER.unpack_from(buffer, start)
        if end - start - 4 < size:
            break
        frames.append(bytes(buffer[start + 4:start + 4 + size]))
        start += 4 + size
    if start:
        del buffer[:start]
    return frames


def _error_blob(exc: BaseException) -> tuple[bytes, str]:
    """An exception as (pickle, worker traceback text): one that does not pickle travels as a
    ``RemoteError`` naming it."""
    cause = exc.__cause__
    tb = cause.tb if isinstance(cause, RemoteTraceback) else ""
    try:
        return pickle.dumps(exc, _PROTOCOL), tb
    except Exception as pickling_error:
        stand_in = RemoteError(
            f"{type_name(exc)}: {exc} (could not be sent by the pool server: "
            f"{pickling_error!r})", type_name=type_name(exc), remote_message=str(exc),
            remote_traceback=tb)
        return pickle.dumps(stand_in, _PROTOCOL), tb


def _value_blob(value: Any) -> tuple[bool, bytes, str]:
    try:
        return True, pickle.dumps(value, _PROTOCOL), ""
    except Exception as exc:
        stand_in = RemoteError(f"{type_name(value)}: result could not be sent by the pool "
                               f"server: {exc!r}", type_name=type_name(value),
                               remote_message=str(exc), remote_traceback="")
        return False, pickle.dumps(stand_in, _PROTOCOL), ""


def _rebuild(ok: bool, blob: bytes, tb: str) -> tuple[bool, Any]:
    try:
        value = pickle.loads(blob)
    except Exception as exc:
        what = "result" if ok else "exception"
        return False, RemoteError(f"the {what} could not be rebuilt here: {exc!r}",
                                  type_name="?", remote_message=str(exc), remote_traceback=tb)
    if not ok and isinstance(value, BaseException) and tb:
        value.__cause__ = RemoteTraceback(tb)
    return ok, value


# ---- the server ---------------------------------------------------------------------------


class PoolServer:
    """Serve named pools to other processes of this machine, on a Unix socket.

    Args:
        pools: name -> pool. The pools stay the caller's: the server never shuts them down.
            More may be added later with ``add_pool``.
        path: the socket's path; an existing socket file there is replaced.
        authkey: the key a client must present; compare ``PoolClient``.
        info: optional, called on the server's thread; what it returns (anything that
            pickles) reaches every client with the pools' stats (``PoolClient.info``).
        stats_interval: seconds between two pushes of every pool's ``stats()`` (and
            ``info``) to the connected clients.

    ``start()`` listens (in a thread of its own); ``close()`` stops it: the tasks still
    queued for clients are cancelled, running ones left to finish. A client that disconnects
    takes its queued tasks with it, as a cancelled caller would.
    """

    def __init__(self, pools: Mapping[str, Any], path: str | os.PathLike[str], authkey: bytes,
                 *, info: Callable[[], Any] | None = None, stats_interval: float = 0.1
                 ) -> None:
        check_timeout("stats_interval", stats_interval)
        self.pools = dict(pools)
        self.path = os.fspath(path)
        self._authkey = bytes(authkey)
        self._info = info
        self._interval = stats_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConnection] = set()
        # Tasks finished on a dispatcher thread, delivered on the server's loop in batches.
        self._lock = threading.Lock()
        self._finished: list[tuple[_ServerConnection, int, Future[Any]]] = []
        self._scheduled = False

    def add_pool(self, name: str, pool: Any) -> None:
        """Serve one more pool; clients that connect from now on see it."""
        self.pools[name] = pool

    def start(self) -> PoolServer:
        """Listen on ``path``; returns once clients can connect."""
        if self._thread is not None:
            return self
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name="stateful-pool-server", daemon=True)
        self._thread.start()
        ready.result(timeout=30)
        return self

    def _run(self, ready: Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)
            self._server = loop.run_until_complete(loop.create_unix_server(
                lambda: _ServerConnection(self, loop), self.path))
            os.chmod(self.path, 0o600)
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        loop.call_later(self._interval, self._push_stats)
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def close(self) -> None:
        """Stop listening and drop every client connection. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.drop()
            await _wind_down(loop)

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop)
        except RuntimeError:
            return
        thread.join(timeout=10)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> PoolServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the server's loop ------------------------------------------------------------------

    def _snapshot(self) -> tuple[Any, ...]:
        stats = {}
        for name, pool in self.pools.items():
            try:
                stats[name] = pool.stats()
            except Exception:  # a pool being torn down: its last snapshot stays
                continue
        info = None
        if self._info is not None:
            try:
                info = self._info()
            except Exception as exc:
                info = {"error": repr(exc)}
        return ("S", stats, info)

    def _push_stats(self) -> None:
        assert self._loop is not None
        self._loop.call_later(self._interval, self._push_stats)
        live = [conn for conn in self._conns if conn.authenticated]
        if not live:
            return
        frame = _frame([self._snapshot()])
        for conn in live:
            conn.write_frame(frame)

    def hello(self) -> tuple[Any, ...]:
        pools = {name: {"queue_size": getattr(pool, "queue_size", None),
                        "execution_timeout": getattr(pool, "execution_timeout", None),
                        "max_batch_size": getattr(pool, "max_batch_size", 1),
                        "batching": getattr(pool, "batching", False)}
                 for name, pool in self.pools.items()}
        return ("H", pools, *self._snapshot()[1:])

    def finished(self, conn: _ServerConnection, task_id: int, future: Future[Any]) -> None:
        """A task's done-callback: on the server's loop (which drives the pool), its answer
        goes out now; on a dispatcher thread, with the others that finished before the
        server's loop got round to them."""
        if asyncio._get_running_loop() is self._loop:
            conn.answer(task_id, future)
            return
        with self._lock:
            self._finished.append((conn, task_id, future))
            if self._scheduled:
                return
            self._scheduled = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the server is closed
            pass

    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._scheduled = False
        for conn, task_id, future in finished:
            conn.answer(task_id, future)


class _StreamCredit:
    __slots__ = ("credit", "event", "task")

    def __init__(self) -> None:
        self.credit = _STREAM_WINDOW
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class _ServerConnection(asyncio.Protocol):
    """One client on the server's loop: its tasks, its streams, its outgoing messages."""

    def __init__(self, server: PoolServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.authenticated = False
        self.tasks: dict[int, Any] = {}  # id -> Future (execute) or asyncio.Task (async path)
        self.streams: dict[int, _StreamCredit] = {}
        self.outbox: list[Any] = []
        self.flush_scheduled = False

    # ---- the socket ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
        except (OSError, AttributeError):  # not Linux: the socket's mode 0600 guards it
            uid = os.getuid()
        if uid != os.getuid():
            transport.close()
            return
        self.server._conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for frame in _split_frames(self.buffer):
            if not self.authenticated:
                if not hmac.compare_digest(frame, self.server._authkey):
                    self.drop()
                    return
                self.authenticated = True
                self.write_frame(_frame([self.server.hello()]))
                continue
            for message in pickle.loads(frame):
                self.handle(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self.authenticated = False
        # The client is gone: its queued tasks leave the queue, its streams stop.
        tasks, self.tasks = self.tasks, {}
        for task in tasks.values():
            _withdraw(task)
        for stream in list(self.streams.values()):
            if stream.task is not None:
                stream.task.cancel()

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def write_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.append(message)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        outbox, self.outbox = self.outbox, []
        if outbox:
            self.write_frame(_frame(outbox))

    # ---- the messages -------------------------------------------------------------------

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "x":
            _, task_id, name, blob, deadline, context = message
            self.execute(task_id, name, blob, deadline, context)
        elif kind == "c":
            task = self.tasks.pop(message[1], None)
            if task is not None:
                _withdraw(task)
            stream = self.streams.get(message[1])
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        elif kind == "a":
            stream = self.streams.get(message[1])
            if stream is not None:
                stream.credit += message[2]
                stream.event.set()
        elif kind == "s":
            _, task_id, name, blob, deadline, context, first, gap = message
            stream = self.streams[task_id] = _StreamCredit()
            stream.task = self.loop.create_task(
                self.stream(task_id, name, blob, deadline, context, first, gap, stream))

    def calls(self, name: str, deadline: Timeout, context: dict[str, Any] | None) -> Any:
        pool = self.server.pools.get(name)
        if pool is None:
            raise KeyError(f"no pool named {name!r} is served here; served: "
                           f"{sorted(self.server.pools)}")
        calls = pool
        if not isinstance(deadline, _Default):
            if deadline is None:
                calls = calls.with_timeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    from .errors import TaskTimeoutError

                    raise TaskTimeoutError("the task's deadline passed before it reached the "
                                           "pool server; it will not run")
                calls = calls.with_timeout(left)
        if context is not None:
            calls = calls.with_context(context)
        return calls

    def execute(self, task_id: int, name: str, blob: bytes, deadline: Timeout,
                context: dict[str, Any] | None) -> None:
        try:
            args, kwargs = pickle.loads(blob)
            calls = self.calls(name, deadline, context)
            pool = self.server.pools[name]
            if pool.queue_size is not None and pool.submission_timeout != 0:
                # submit_execute could wait for room in the queue: this loop must not.
                self.tasks[task_id] = self.loop.create_task(
                    self.execute_async(task_id, calls, args, kwargs))
                return
            future = calls.submit_execute(*args, **kwargs)
        except BaseException as exc:
            self.send(("r", task_id, False, *_error_blob(exc)))
            return
        self.tasks[task_id] = future
        future.add_done_callback(lambda f: self.server.finished(self, task_id, f))

    async def execute_async(self, task_id: int, calls: Any, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> None:
        try:
            value = await calls.async_execute(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self.tasks.pop(task_id, None) is not None:
                self.send(("r", task_id, False, *_error_blob(exc)))
            return
        if self.tasks.pop(task_id, None) is not None:
            self.send(("r", task_id, *_value_blob(value)))

    def answer(self, task_id: int, future: Future[Any]) -> None:
        if self.tasks.pop(task_id, None) is None or future.cancelled():
            return  # withdrawn by its client
        exc = future.exception()
        if exc is None:
            self.send(("r", task_id, *_value_blob(future.result())))
        else:
            self.send(("r", task_id, False, *_error_blob(exc)))

    async def stream(self, task_id: int, name: str, blob: bytes, deadline: Timeout,
                     context: dict[str, Any] | None, first: Timeout, gap: Timeout,
                     credit: _StreamCredit) -> None:
        source = None
        try:
            args, kwargs = pickle.loads(blob)
            calls = self.calls(name, deadline, context)
            if not (isinstance(first, _Default) and isinstance(gap, _Default)):
                options = {key: value for key, value in (("first_chunk_timeout", first),
                                                         ("chunk_timeout", gap))
                           if not isinstance(value, _Default)}
                calls = calls.with_stream_timeouts(**options)
            source = calls.async_stream(*args, **kwargs)
            async for chunk in source:
                self.send(("k", task_id, *_value_blob(chunk)))
                credit.credit -= 1
                while credit.credit <= 0:
                    credit.event.clear()
                    await credit.event.wait()
        except asyncio.CancelledError:
            if source is not None:
                source.close()
            raise
        except BaseException as exc:
            self.send(("e", task_id, False, *_error_blob(exc)))
        else:
            self.send(("e", task_id, True, b"", ""))
        finally:
            self.streams.pop(task_id, None)


async def _wind_down(loop: asyncio.AbstractEventLoop) -> None:
    """Let closed transports finish closing, cancel what is left, stop the loop."""
    for _ in range(3):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    others = [task for task in asyncio.all_tasks(loop) if task is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    loop.stop()


def _withdraw(task: Any) -> None:
    """Its caller is gone: a queued task leaves the queue, a running one is abandoned (the
    pool's shutdown does not wait for it)."""
    if task.cancel() or isinstance(task, asyncio.Task):
        return
    # The task's pool, through its cancel hook (a bound method of the pool): its dispatcher
    # must be told, and woken, since a shutdown in progress may be waiting for this task.
    abandon = getattr(getattr(task, "on_cancel", None), "__self__", None)
    dispatcher = getattr(abandon, "_dispatcher", None)
    if dispatcher is not None and not task.done():
        dispatcher.abandoned(task)


# ---- the client ---------------------------------------------------------------------------


class _RemoteFuture(Future[Any]):
    """A remote task's future: cancelling it withdraws the task from the server."""

    def __init__(self, client: PoolClient, task_id: int) -> None:
        super().__init__()
        self._client = client
        self._id = task_id

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._client._withdraw(self._id)
        return cancelled


class PoolClient:
    """A connection to a ``PoolServer``; ``client.pool(name)`` is one of its pools.

    Make one with ``PoolClient.connect(path, authkey)`` (its socket is read by a thread of
    its own) or ``await PoolClient.connect_async(path, authkey)`` (read by the running event
    loop: the cheapest for a coroutine-based server, results reach their coroutines without
    a thread hop). Either serves every thread and event loop of the process.

    If the connection is lost, the tasks in flight fail with ``ServerGoneError`` and the
    client connects again by itself (every ``reconnect_interval`` seconds); ``on_lost`` (if
    given) is called on the client's loop each time the connection goes.
    """

    def __init__(self, path: str | os.PathLike[str], authkey: bytes, *,
                 reconnect_interval: float | None = 0.5,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.path = os.fspath(path)
        self._authkey = bytes(authkey)
        self.reconnect_interval = reconnect_interval
        self.on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._own_thread: threading.Thread | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, Any] = {}
        self._ids = itertools.count(1).__next__
        self._lock = threading.Lock()
        self._outbox: list[Any] = []
        self._scheduled = False
        self._buffer = bytearray()
        self.pool_options: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, PoolStats] = {}
        self.info: Any = None
        self.stats_at = 0.0
        self.connected = False
        self._closed = False

    # ---- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str | os.PathLike[str], authkey: bytes, **options: Any
                ) -> PoolClient:
        """Connect, with a thread of its own reading the socket.

        Raises:
            ServerGoneError: no server answers at ``path`` (or it refused the key).
        """
        client = cls(path, authkey, **options)
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        client._own_thread = threading.Thread(target=run, name="stateful-pool-client",
                                              daemon=True)
        client._own_thread.start()
        started.wait()
        client._loop = loop
        client._loop_thread_id = client._own_thread.ident
        try:
            asyncio.run_coroutine_threadsafe(client._connect(), loop).result()
        except BaseException:
            client.close()
            raise
        return client

    @classmethod
    async def connect_async(cls, path: str | os.PathLike[str], authkey: bytes, **options: Any
                            ) -> PoolClient:
        """Connect from a coroutine; the running event loop reads the socket from now on
        (keep the loop running while the client is used)."""
        client = cls(path, authkey, **options)
        client._loop = asyncio.get_running_loop()
        client._loop_thread_id = threading.get_ident()
        await client._connect()
        return client

    async def _connect(self) -> None:
        loop = self._loop
        assert loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self.path), _CONNECT_TIMEOUT)
            await loop.sock_sendall(sock, _HEADER.pack(len(self._authkey)) + self._authkey)
            protocol = _ClientProtocol(self)
            hello = protocol.hello = loop.create_future()
            await loop.create_unix_connection(lambda: protocol, sock=sock)
            await asyncio.wait_for(hello, _CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise ServerGoneError(f"no pool server answers at {self.path}: {exc!r}") from None

    def _reconnect_later(self) -> None:
        if self._closed or self.reconnect_interval is None or self._loop is None:
            return

        async def retry() -> None:
            while not self._closed and not self.connected:
                await asyncio.sleep(self.reconnect_interval or 0.5)
                try:
                    await self._connect()
                except ServerGoneError:
                    continue

        self._loop.create_task(retry())

    # ---- the protocol's side ------------------------------------------------------------

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def _receive(self, messages: list[tuple[Any, ...]]) -> None:
        pending = self._pending
        for message in messages:
            kind = message[0]
            if kind == "r":
                _, task_id, ok, blob, tb = message
                future = pending.pop(task_id, None)
                if future is not None:
                    _settle(future, *_rebuild(ok, blob, tb))
            elif kind == "k":
                _, task_id, ok, blob, tb = message
                stream = pending.get(task_id)
                if stream is not None:
                    stream.add(ok, blob, tb)
            elif kind == "e":
                _, task_id, ok, blob, tb = message
                stream = pending.pop(task_id, None)
                if stream is not None:
                    stream.end(None if ok else _rebuild(False, blob, tb)[1])
            elif kind == "S":
                self._stats.update(message[1])
                self.info = message[2]
                self.stats_at = time.monotonic()
            elif kind == "H":
                self.pool_options = message[1]
                self._stats = dict(message[2])
                self.info = message[3]
                self.stats_at = time.monotonic()
                self.connected = True

    def _connection_lost(self, transport: asyncio.Transport) -> None:
        if self._transport is not transport:
            return
        was_connected = self.connected
        self._transport = None
        self.connected = False
        with self._lock:
            self._outbox.clear()
        pending, self._pending = self._pending, {}
        error = ServerGoneError(f"the connection to the pool server at {self.path} was lost; "
                                "the outcome of this task is unknown")
        for waiter in pending.values():
            if isinstance(waiter, _StreamState):
                waiter.end(error)
            else:
                _settle(waiter, False, error)
        if was_connected and not self._closed:
            if self.on_lost is not None:
                self.on_lost()
            self._reconnect_later()

    # ---- sending --------------------------------------------------------------------------

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._outbox.append(message)
            if self._scheduled:
                return
            self._scheduled = True
        assert self._loop is not None
        if self._on_loop():
            self._loop.call_soon(self._flush)
        else:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, []
            self._scheduled = False
        transport = self._transport
        if outbox and transport is not None and not transport.is_closing():
            transport.write(_frame(outbox))

    def _withdraw(self, task_id: int) -> None:
        if self._pending.pop(task_id, None) is not None and self.connected:
            self._send(("c", task_id))

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("the pool client is closed")
        if not self.connected:
            raise ServerGoneError(f"not connected to the pool server at {self.path} (it is "
                                  "down or restarting); retry later")

    def _submit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: Timeout, context: dict[str, Any] | None) -> _RemoteFuture:
        self._check_open()
        blob = pickle.dumps((args, kwargs), _PROTOCOL)
        task_id = self._ids()
        future = _RemoteFuture(self, task_id)
        self._pending[task_id] = future
        self._send(("x", task_id, name, blob, _deadline(timeout), context))
        return future

    async def _async_execute(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                             timeout: Timeout, context: dict[str, Any] | None) -> Any:
        if not self._on_loop():
            return await asyncio.wrap_future(self._submit(name, args, kwargs, timeout, context))
        self._check_open()
        blob = pickle.dumps((args, kwargs), _PROTOCOL)
        task_id = self._ids()
        assert self._loop is not None
        future = self._loop.create_future()
        self._pending[task_id] = future
        self._send(("x", task_id, name, blob, _deadline(timeout), context))
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(task_id)
            raise

    def _open_stream(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     timeout: Timeout, context: dict[str, Any] | None,
                     first: Timeout, gap: Timeout) -> _StreamState:
        self._check_open()
        blob = pickle.dumps((args, kwargs), _PROTOCOL)
        task_id = self._ids()
        state = _StreamState(self, task_id)
        self._pending[task_id] = state
        self._send(("s", task_id, name, blob, _deadline(timeout), context, first, gap))
        return state

    # ---- the public side ------------------------------------------------------------------

    def pool(self, name: str) -> RemotePool[Any]:
        """The served pool called ``name``.

        Raises:
            KeyError: the server serves no pool of that name.
        """
        if name not in self.pool_options:
            raise KeyError(f"the pool server serves no pool named {name!r}; it serves "
                           f"{sorted(self.pool_options)}")
        return RemotePool(self, name)

    @property
    def pool_names(self) -> list[str]:
        return sorted(self.pool_options)

    def stats(self, name: str) -> PoolStats:
        """The last ``stats()`` of pool ``name`` pushed by the server (every
        ``stats_interval``; ``stats_at`` says when it came)."""
        return self._stats[name]

    def close(self) -> None:
        """Disconnect; tasks in flight fail with ``ServerGoneError``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        transport = self._transport
        if self._own_thread is None:  # the caller's loop reads the socket: it goes on
            if transport is not None:
                loop.call_soon_threadsafe(transport.close)
            return

        async def shut() -> None:
            if transport is not None:
                transport.close()
            await _wind_down(loop)

        try:
            asyncio.run_coroutine_threadsafe(shut(), loop)
        except RuntimeError:
            return
        self._own_thread.join(timeout=10)

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _deadline(timeout: Timeout) -> Timeout:
    if timeout is None or isinstance(timeout, _Default):
        return timeout
    return time.monotonic() + timeout


def _settle(future: Any, ok: bool, value: Any) -> None:
    if isinstance(future, Future):
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except InvalidStateError:
            pass  # cancelled by its caller meanwhile
    elif not future.done():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client._connection_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for frame in _split_frames(self.buffer):
            self.client._receive(pickle.loads(frame))
        if self.hello is not None and self.client.connected and not self.hello.done():
            self.hello.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.hello is not None and not self.hello.done():
            self.hello.set_exception(ConnectionResetError("the pool server refused the "
                                                          "connection (wrong auth key?)"))
        assert self.transport is not None
        self.client._connection_lost(self.transport)


# ---- streams on the client ----------------------------------------------------------------


class _StreamState:
    """A remote stream's chunks as they arrive; read by one reader, thread or coroutine."""

    def __init__(self, client: PoolClient, task_id: int) -> None:
        self.client = client
        self.id = task_id
        self.lock = threading.Lock()
        self.chunks: deque[tuple[bool, bytes, str]] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.waiter: Any = None  # a held threading.Lock, or (loop, asyncio future)
        self.consumed = 0  # since the last credit

    # the client's loop
    def add(self, ok: bool, blob: bytes, tb: str) -> None:
        with self.lock:
            self.chunks.append((ok, blob, tb))
            waiter, self.waiter = self.waiter, None
        _wake(waiter)

    def end(self, error: BaseException | None) -> None:
        with self.lock:
            self.ended = True
            self.error = error
            waiter, self.waiter = self.waiter, None
        _wake(waiter)

    # the reader
    def take(self) -> list[tuple[bool, bytes, str]]:
        with self.lock:
            chunks = list(self.chunks)
            self.chunks.clear()
        return chunks

    def wait(self) -> list[tuple[bool, bytes, str]]:
        with self.lock:
            if not self.chunks and not self.ended:
                waiter = threading.Lock()
                waiter.acquire()
                self.waiter = waiter
            else:
                waiter = None
        if waiter is not None:
            waiter.acquire()
        return self.take()

    async def wait_async(self) -> list[tuple[bool, bytes, str]]:
        loop = asyncio.get_running_loop()
        with self.lock:
            if not self.chunks and not self.ended:
                future = loop.create_future()
                self.waiter = (loop, future)
            else:
                future = None
        if future is not None:
            await future
        return self.take()

    def credit(self) -> None:
        n, self.consumed = self.consumed, 0
        if n and not self.ended and self.client.connected:
            self.client._send(("a", self.id, n))

    def stop(self) -> None:
        if not self.ended:
            self.ended = True
            self.client._withdraw(self.id)


def _wake(waiter: Any) -> None:
    if waiter is None:
        return
    if type(waiter) is tuple:
        loop, future = waiter
        if _running(loop):
            if not future.done():
                future.set_result(None)
            return
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            pass  # its loop is closed: nobody reads any more
    else:
        waiter.release()


def _running(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _RemoteReader:
    _state: _StreamState
    _hand: deque[tuple[bool, bytes, str]]
    _finished: bool

    def _next_from_hand(self) -> Any:
        ok, blob, tb = self._hand.popleft()
        state = self._state
        state.consumed += 1
        if state.consumed >= _STREAM_WINDOW // 2:
            state.credit()
        ok, value = _rebuild(ok, blob, tb)
        if not ok:
            self._stop()
            raise value
        return value

    def _end_of_chunks(self) -> None:
        self._finished = True
        if self._state.error is not None:
            raise self._state.error

    def _stop(self) -> None:
        if not self._finished:
            self._finished = True
            self._hand.clear()
            self._state.stop()


class RemoteChunkStream(_RemoteReader, Generic[C], Iterator[C]):
    """What ``RemotePool.stream(...)`` returns: iterate it for the chunks. Leaving the loop
    early, ``close()`` or leaving a ``with`` block stops the stream in the worker."""

    def __init__(self, state: _StreamState) -> None:
        self._state = state
        self._hand = deque()
        self._finished = False

    def __iter__(self) -> RemoteChunkStream[C]:
        return self

    def __next__(self) -> C:
        if self._hand:
            return self._next_from_hand()  # type: ignore[no-any-return]
        if self._finished:
            raise StopIteration
        if self._state.consumed:
            self._state.credit()
        self._hand.extend(self._state.wait())
        if not self._hand:
            self._end_of_chunks()
            raise StopIteration
        return self._next_from_hand()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> RemoteChunkStream[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self._stop()


class AsyncRemoteChunkStream(_RemoteReader, Generic[C], AsyncIterator[C]):
    """What ``RemotePool.async_stream(...)`` returns: ``async for`` it. Submitted at the
    first ``__anext__``; cancelling the coroutine that awaits it, leaving the loop early or
    ``aclose()`` stops the stream in the worker."""

    def __init__(self, start: Callable[[], _StreamState]) -> None:
        self._start: Callable[[], _StreamState] | None = start
        self._hand = deque()
        self._finished = False

    def __aiter__(self) -> AsyncRemoteChunkStream[C]:
        return self

    async def __anext__(self) -> C:
        if self._start is not None:
            start, self._start = self._start, None
            self._state = start()
        if self._hand:
            return self._next_from_hand()  # type: ignore[no-any-return]
        if self._finished:
            raise StopAsyncIteration
        state = self._state
        if state.consumed:
            state.credit()
        try:
            self._hand.extend(await state.wait_async())
        except asyncio.CancelledError:
            self._stop()
            raise
        if not self._hand:
            self._end_of_chunks()
            raise StopAsyncIteration
        return self._next_from_hand()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._start = None
        if hasattr(self, "_state"):
            self._stop()
        self._finished = True

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncRemoteChunkStream[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self.close()


# ---- the pool as a caller sees it -----------------------------------------------------------


class RemotePool(Generic[C]):
    """A pool served by a ``PoolServer``, called as an ``SPool`` is.

    Differences from a local ``SPool``: a refusal at submission (``QueueFullError``,
    ``NoWorkersError``, ``PoolClosedError``, a ``TypeError`` from batching) comes with the
    answer, from the future or the ``await``, not from the submit call; a task whose future
    is cancelled while it runs is abandoned by the server's pool (its result is dropped);
    ``stats()`` is the server's last push (``stats_interval``, 0.1 s by default). Spawning
    and shutting down are the server's business.
    """

    def __init__(self, client: PoolClient, name: str, timeout: Timeout = _DEFAULT,
                 context: dict[str, Any] | None = None,
                 stream_timeouts: tuple[Timeout, Timeout] = (_DEFAULT, _DEFAULT)) -> None:
        self.client = client
        self.name = name
        self._timeout = timeout
        self._context = context
        self._stream_timeouts = stream_timeouts

    @property
    def queue_size(self) -> int | None:
        return self.client.pool_options[self.name]["queue_size"]  # type: ignore[no-any-return]

    @property
    def max_batch_size(self) -> int:
        return self.client.pool_options[self.name]["max_batch_size"]  # type: ignore[no-any-return]

    def with_timeout(self, seconds: float | None) -> RemotePool[C]:
        check_timeout("timeout", seconds)
        return RemotePool(self.client, self.name, seconds, self._context, self._stream_timeouts)

    def with_context(self, context: Mapping[str, Any]) -> RemotePool[C]:
        from ._calls import checked_context

        return RemotePool(self.client, self.name, self._timeout, checked_context(context),
                          self._stream_timeouts)

    def with_stream_timeouts(self, *, first_chunk_timeout: Timeout = _DEFAULT,
                             chunk_timeout: Timeout = _DEFAULT) -> RemotePool[C]:
        for label, value in (("first_chunk_timeout", first_chunk_timeout),
                             ("chunk_timeout", chunk_timeout)):
            if not isinstance(value, _Default):
                check_timeout(label, value)
        return RemotePool(self.client, self.name, self._timeout, self._context,
                          (first_chunk_timeout, chunk_timeout))

    def submit_execute(self, *args: Any, **kwargs: Any) -> Future[C]:
        """Submit one task; a ``concurrent.futures.Future`` of its result. Cancelling it
        withdraws the task (a queued one never runs)."""
        return self.client._submit(self.name, args, kwargs, self._timeout, self._context)

    def execute(self, *args: Any, **kwargs: Any) -> C:
        if self.client._on_loop():
            raise RuntimeError("RemotePool.execute() cannot wait on the thread of the event "
                               "loop that reads the client's socket; await async_execute()")
        return self.submit_execute(*args, **kwargs).result()

    async def async_execute(self, *args: Any, **kwargs: Any) -> C:
        """Await one task; cancelling the awaiting coroutine withdraws it."""
        return await self.client._async_execute(  # type: ignore[no-any-return]
            self.name, args, kwargs, self._timeout, self._context)

    def stream(self, *args: Any, **kwargs: Any) -> RemoteChunkStream[Any]:
        if self.client._on_loop():
            raise RuntimeError("RemotePool.stream() cannot wait on the thread of the event "
                               "loop that reads the client's socket; use async_stream()")
        first, gap = self._stream_timeouts
        return RemoteChunkStream(self.client._open_stream(
            self.name, args, kwargs, self._timeout, self._context, first, gap))

    def async_stream(self, *args: Any, **kwargs: Any) -> AsyncRemoteChunkStream[Any]:
        first, gap = self._stream_timeouts
        client = self.client
        client._check_open()
        return AsyncRemoteChunkStream(lambda: client._open_stream(
            self.name, args, kwargs, self._timeout, self._context, first, gap))

    def stats(self) -> PoolStats:
        """The pool's ``stats()`` as the server last pushed it."""
        return self.client.stats(self.name)

    def __repr__(self) -> str:
        return f"<RemotePool {self.name!r} at {self.client.path}>"


for _cls in (ServerGoneError, PoolServer, PoolClient, RemotePool, RemoteChunkStream,
             AsyncRemoteChunkStream):
    _cls.__module__ = "stateful_pool"
del _cls
