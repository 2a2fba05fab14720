"""Pools served to other processes (``PoolServer``, ``PoolClient``, ``RemotePool``), from the
callers' side: real worker processes, real client processes, threads and event loops at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from concurrent.futures import CancelledError

import pytest
from procs import wait_until
from remote_clients import threads_and_coroutines
from stream_workers import Streamer
from workers import Tasks

from stateful_pool import (
    PoolClient,
    PoolServer,
    QueueFullError,
    SPool,
    TaskTimeoutError,
    WorkerCrashedError,
)
from stateful_pool._remote import ServerGoneError
from stateful_pool.errors import RemoteError

KEY = b"test-key"


@pytest.fixture
def socket_path(tmp_path):
    return str(tmp_path / "pools.sock")


@pytest.fixture
def served(make_pool, socket_path, tmp_path):
    """A two-worker ``Tasks`` pool served as "tasks"; yields (pool, server)."""
    def serve(workers: int = 2, **options):
        pool = make_pool(Tasks, **options)
        for _ in range(workers):
            pool.spawn(marker_dir=str(tmp_path))
        server = PoolServer({"tasks": pool}, socket_path, KEY, stats_interval=0.05).start()
        servers.append(server)
        return pool, server

    servers: list[PoolServer] = []
    yield serve
    for server in servers:
        server.close()


@pytest.fixture
def client(socket_path):
    clients: list[PoolClient] = []

    def connect(**options):
        c = PoolClient.connect(socket_path, KEY, **options)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


def test_two_client_processes_call_from_threads_and_coroutines_at_once(served, socket_path):
    pool, _ = served(workers=2)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=threads_and_coroutines,
                         args=(socket_path, KEY, tag, 3, 8, 40, results)) for tag in "ab"]
    for proc in procs:
        proc.start()
    try:
        answers = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    assert answers == [("a", 0, 11 * 40, None), ("b", 0, 11 * 40, None)]
    assert pool.stats().completed == 2 * 11 * 40


def test_the_workers_own_exception_types_and_tracebacks_come_back(served, client):
    served(workers=1)
    tasks = client().pool("tasks")
    with pytest.raises(ValueError, match="boom") as caught:
        tasks.execute("raise", "boom")
    assert "do_raise" in str(caught.value.__cause__)  # the worker's traceback rides along
    with pytest.raises(RemoteError, match="could not be"):
        tasks.execute("unpicklable_result")
    with pytest.raises(KeyError):
        client().pool("nope")
    assert tasks.execute("echo", {"still": "serving"}) == {"still": "serving"}


def test_a_worker_killed_under_load_fails_only_the_task_it_held(served, client):
    pool, _ = served(workers=2)
    tasks = client().pool("tasks")

    async def load():
        calls = [tasks.async_execute("sleep", 0.02, i) for i in range(60)]
        calls.insert(30, tasks.async_execute("sigkill"))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(load())
    crashed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(crashed) == 1 and isinstance(outcomes[30], WorkerCrashedError), outcomes
    assert outcomes[30].how == "signal SIGKILL"
    assert [o for o in outcomes if not isinstance(o, BaseException)] == list(range(60))
    assert wait_until(lambda: pool.stats().serving_workers == 2, 10)
    assert tasks.execute("echo", 1) == 1


def test_a_worker_killed_from_outside_under_load(served, client):
    pool, _ = served(workers=2)
    tasks = client().pool("tasks")
    futures = [tasks.submit_execute("sleep", 0.05, i) for i in range(40)]
    assert wait_until(lambda: pool.stats().busy_workers == 2, 5)
    victim = pool.stats().workers[0].pid
    os.kill(victim, signal.SIGKILL)
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=30))
        except WorkerCrashedError as exc:
            outcomes.append(exc)
    crashed = [o for o in outcomes if isinstance(o, WorkerCrashedError)]
    assert len(crashed) == 1 and crashed[0].pid == victim
    assert len([o for o in outcomes if not isinstance(o, WorkerCrashedError)]) == 39


def test_cancelled_before_start_never_runs(served, client, tmp_path):
    pool, _ = served(workers=1)
    tasks = client().pool("tasks")
    busy = tasks.submit_execute("sleep", 0.6, "busy")
    assert wait_until(lambda: pool.stats().busy_workers == 1, 5)
    queued = tasks.submit_execute("mark", "from-future")

    async def cancel_a_coroutine():
        call = asyncio.ensure_future(tasks.async_execute("mark", "from-coroutine"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    assert wait_until(lambda: pool.stats().queue_depth == 1, 5)
    assert queued.cancel()
    with pytest.raises(CancelledError):
        queued.result()
    asyncio.run(cancel_a_coroutine())
    assert wait_until(lambda: pool.stats().queue_depth == 0, 5)
    assert busy.result(timeout=10) == "busy"
    assert tasks.execute("echo", "after") == "after"
    assert not (tmp_path / "from-future").exists()
    assert not (tmp_path / "from-coroutine").exists()
    assert pool.stats().cancelled == 2


def test_deadlines_drop_queued_tasks_and_answer_at_the_deadline(served, client, tmp_path):
    pool, _ = served(workers=1)
    tasks = client().pool("tasks")
    tasks.submit_execute("sleep", 0.8)
    assert wait_until(lambda: pool.stats().busy_workers == 1, 5)
    started = time.monotonic()
    with pytest.raises(TaskTimeoutError):
        tasks.with_timeout(0.2).execute("mark", "late")
    assert 0.15 < time.monotonic() - started < 0.6
    assert wait_until(lambda: pool.stats().in_flight == 0, 5)
    assert not (tmp_path / "late").exists()
    # The pool's own execution_timeout applies unless the call says otherwise.
    assert tasks.with_timeout(None).execute("sleep", 0.1, "ok") == "ok"


def test_more_callers_than_the_queue_holds_get_queue_full(served, client):
    pool, _ = served(workers=1, queue_size=3, submission_timeout=0)
    tasks = client().pool("tasks")

    async def crowd():
        return await asyncio.gather(*(tasks.async_execute("sleep", 0.05, i) for i in range(20)),
                                    return_exceptions=True)

    outcomes = asyncio.run(crowd())
    full = [o for o in outcomes if isinstance(o, QueueFullError)]
    served_ok = [o for o in outcomes if not isinstance(o, BaseException)]
    assert full and served_ok and len(full) + len(served_ok) == 20
    assert len(served_ok) <= 1 + 3 + 1  # running, queued, and one freed place at most
    assert tasks.execute("echo", "room again") == "room again"


def test_a_queue_with_a_submission_wait_does_not_stall_the_server(served, client):
    # submission_timeout > 0: callers wait for room, the server's loop does not.
    pool, _ = served(workers=1, queue_size=1, submission_timeout=10)
    tasks = client().pool("tasks")
    waiting = [tasks.submit_execute("sleep", 0.2, i) for i in range(4)]
    assert [f.result(timeout=10) for f in waiting] == [0, 1, 2, 3]


def test_contexts_reach_the_worker(make_pool, socket_path, client):
    from workers import Contextual

    pool = make_pool(Contextual)
    pool.spawn()
    with PoolServer({"ctx": pool}, socket_path, KEY):
        remote = client().pool("ctx")
        assert remote.with_context({"request_id": "r-1"}).execute("x") == (
            "x", [{"request_id": "r-1"}])


def test_streams_relay_chunks_errors_and_stop_in_the_worker(make_pool, socket_path, client,
                                                            tmp_path):
    pool = make_pool(Streamer)
    pool.spawn(marker_dir=str(tmp_path))
    with PoolServer({"s": pool}, socket_path, KEY):
        remote = client().pool("s")
        assert list(remote.stream("count", 200)) == list(range(200))  # past the credit window
        with pytest.raises(ValueError, match="failed after 3"):
            list(remote.stream("raise_after", 3))

        async def read_some():
            chunks = []
            async for chunk in remote.async_stream("tracked", "left", 10_000, 0.005):
                chunks.append(chunk)
                if len(chunks) == 3:
                    break
            return chunks

        assert asyncio.run(read_some()) == [0, 1, 2]
        assert wait_until(lambda: (tmp_path / "left").exists(), 5)  # its finally ran
        with pytest.raises(TaskTimeoutError):
            list(remote.with_stream_timeouts(chunk_timeout=0.2).stream("stall_after", 2, 5))


def test_server_gone_fails_calls_in_flight_then_the_client_reconnects(make_pool, socket_path,
                                                                      client):
    pool = make_pool(Tasks)
    pool.spawn()
    server = PoolServer({"tasks": pool}, socket_path, KEY).start()
    c = client(reconnect_interval=0.1)
    tasks = c.pool("tasks")
    in_flight = tasks.submit_execute("sleep", 1.0)
    time.sleep(0.1)
    server.close()
    with pytest.raises(ServerGoneError):
        in_flight.result(timeout=5)
    with pytest.raises(ServerGoneError):
        tasks.execute("echo", 1)
    server = PoolServer({"tasks": pool}, socket_path, KEY).start()
    try:
        assert wait_until(lambda: c.connected, 5)
        assert tasks.execute("echo", 2) == 2
    finally:
        server.close()


def test_a_wrong_key_is_refused_before_anything_is_unpickled(served, socket_path):
    served(workers=1)
    with pytest.raises(ServerGoneError):
        PoolClient.connect(socket_path, b"wrong", reconnect_interval=None)
    assert oct(os.stat(socket_path).st_mode & 0o777) == "0o600"
    # A raw peer sending a pickle first is dropped unread.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(5)
        raw.connect(socket_path)
        raw.sendall(struct.pack(">I", 4) + b"\x80\x05N.")
        assert raw.recv(10) == b""


def test_a_client_that_goes_away_takes_its_queued_tasks_with_it(served, socket_path, tmp_path):
    pool, _ = served(workers=1)
    c = PoolClient.connect(socket_path, KEY)
    tasks = c.pool("tasks")
    tasks.submit_execute("sleep", 0.5)
    for n in range(5):
        tasks.submit_execute("mark", f"orphan-{n}")
    assert wait_until(lambda: pool.stats().queue_depth == 5, 5)
    c.close()
    assert wait_until(lambda: pool.stats().in_flight == 0, 5)
    assert not list(tmp_path.glob("orphan-*"))


def test_stats_are_pushed_and_threads_share_one_client(served, client):
    pool, _ = served(workers=2)
    tasks = client().pool("tasks")
    errors = []

    def call(n):
        try:
            for i in range(50):
                assert tasks.execute("echo", (n, i)) == (n, i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert wait_until(lambda: tasks.stats().completed == 200, 5)
    assert tasks.stats().serving_workers == 2
    assert isinstance(SPool, type)


def test_a_client_that_leaves_during_shutdown_lets_the_shutdown_end(served, client):
    """``shutdown()`` waits for a running task while its remote caller waits for it; when
    that client goes, the pool stops waiting at once and stops the worker."""
    pool, _ = served(workers=1)
    remote = client()
    remote.pool("tasks").submit_execute("sleep", 30)
    assert wait_until(lambda: pool.stats().busy_workers == 1, 10)
    closing = threading.Thread(target=pool.shutdown)
    closing.start()
    time.sleep(0.3)
    assert closing.is_alive()  # the task's caller still waits for it
    t0 = time.monotonic()
    remote.close()
    closing.join(10)
    assert not closing.is_alive()
    assert time.monotonic() - t0 < 5
