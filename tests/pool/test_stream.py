"""Streams from the user's side: a worker whose ``execute`` yields, real worker processes,
sync and async readers, stopping, faults and time limits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import wait_until
from stream_workers import Streamer

from stateful_pool import (
    ChunkStream,
    RemoteError,
    TaskTimeoutError,
    WorkerCrashedError,
)

# Every stream in these tests ends by itself within this bound (the pool enforces it).
BOUND = 30.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pool(make_pool, tmp_path):
    pool = make_pool(Streamer, execution_timeout=BOUND)
    pool.spawn(marker_dir=str(tmp_path))
    return pool


def test_chunks_arrive_in_order_sync_async_and_execute_gives_the_list(pool):
    stream = pool.stream("count", 5)
    assert isinstance(stream, ChunkStream)
    assert list(stream) == [0, 1, 2, 3, 4]
    assert pool.execute("count", 3) == [0, 1, 2]
    assert pool.submit_execute("count", 4).result(timeout=BOUND) == [0, 1, 2, 3]

    async def main():
        got = [c async for c in pool.async_stream("count", 5)]
        return got, await pool.async_execute("count", 2)

    assert asyncio.run(main()) == ([0, 1, 2, 3, 4], [0, 1])
    assert list(pool.stream("count", 0)) == []


def test_many_chunks_arrive_complete_and_grouped(pool):
    assert list(pool.stream("count", 20_000)) == list(range(20_000))


def test_sync_and_async_readers_at_once(make_pool):
    pool = make_pool(Streamer, execution_timeout=BOUND)
    pool.spawn()
    pool.spawn()
    results = {}

    def thread_reader(i):
        results[("thread", i)] = list(pool.stream("count", 300, 0.0005))

    async def loop_readers():
        async def one(i):
            results[("async", i)] = [c async for c in pool.async_stream("count", 300)]

        await asyncio.gather(*(one(i) for i in range(4)))

    threads = [threading.Thread(target=thread_reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(loop_readers())
    for t in threads:
        t.join(BOUND)
    assert len(results) == 7
    assert all(chunks == list(range(300)) for chunks in results.values())


def test_break_closes_the_generator_in_the_worker_and_it_serves_the_next_task_at_once(
        pool, tmp_path):
    for chunk in pool.stream("tracked", "a", 10_000, 0.01):
        if chunk == 3:
            break
    started = time.monotonic()
    report = pool.execute("report", "a")
    assert time.monotonic() - started < 1.0  # not after the other 9,996 steps
    assert report["closed"] is True
    assert report["steps"] <= 6  # stopped at its next yield, give or take the group in flight
    assert (tmp_path / "a").exists()  # its finally ran
    assert pool.stats().cancelled == 1


def test_close_and_with_block_stop_the_stream(pool):
    stream = pool.stream("tracked", "b", 10_000, 0.01)
    assert next(stream) == 0
    stream.close()
    with pool.stream("tracked", "c", 10_000, 0.01) as stream:
        assert next(stream) == 0
    assert pool.execute("report", "b")["closed"]
    assert pool.execute("report", "c")["closed"]
    with pytest.raises(StopIteration):
        next(stream)


def test_cancelling_the_awaiting_task_stops_the_stream_in_the_worker(pool, tmp_path):
    got = []

    async def reader():
        async for chunk in pool.async_stream("tracked", "d", 10_000, 0.01):
            got.append(chunk)

    async def main():
        task = asyncio.create_task(reader())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.wait_for(pool.async_execute("report", "d"), BOUND)

    report = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert report["closed"] is True
    assert report["steps"] < 20
    assert got == list(range(len(got)))


def test_breaking_an_async_loop_stops_the_stream(pool):
    async def main():
        stream = pool.async_stream("tracked", "e", 10_000, 0.01)
        async for chunk in stream:
            if chunk == 2:
                break
        await stream.aclose()
        return await pool.async_execute("report", "e")

    assert asyncio.run(asyncio.wait_for(main(), BOUND))["closed"] is True


def test_a_deadline_stops_the_stream_in_the_worker(pool):
    got = []
    with pytest.raises(TaskTimeoutError, match="stopped in the worker"):
        for chunk in pool.with_timeout(0.5).stream("tracked", "f", 10_000, 0.01):
            got.append(chunk)
    assert got and got == list(range(len(got)))
    report = pool.execute("report", "f")
    assert report["closed"] is True and report["steps"] < 200
    assert pool.stats().timed_out == 1


def test_first_chunk_and_between_chunk_limits(pool):
    # Steady chunks never trip the between-chunk limit, however long the stream.
    steady = pool.with_stream_timeouts(first_chunk_timeout=2.0, chunk_timeout=0.5)
    assert len(list(steady.stream("count", 40, 0.05))) == 40
    fast_first = pool.with_stream_timeouts(first_chunk_timeout=0.3)
    with pytest.raises(TaskTimeoutError, match="first chunk"):
        list(fast_first.stream("stall_after", 0, 1.0))
    got = []
    # (queued behind the stalled one until it reaches its next yield: the limit counts from
    # the first chunk)
    with pytest.raises(TaskTimeoutError, match="chunk_timeout=0.3"):
        for chunk in pool.with_stream_timeouts(chunk_timeout=0.3).stream("stall_after", 3, 1.0):
            got.append(chunk)
    assert got == [0, 1, 2]  # the chunks held for grouping did not wait behind the stall
    assert pool.stats().timed_out == 2


def test_pool_wide_stream_limits(make_pool):
    pool = make_pool(Streamer, chunk_timeout=0.3, execution_timeout=BOUND)
    pool.spawn()
    with pytest.raises(TaskTimeoutError):
        list(pool.stream("stall_after", 1, 5.0))
    # with_stream_timeouts(None) lifts the pool's limit for one call
    assert list(pool.with_stream_timeouts(chunk_timeout=None).stream("stall_after", 1, 0.6)) \
        == [0, 1]


def test_hang_timeout_never_kills_a_healthy_long_stream_nor_one_paused_by_its_reader(make_pool):
    pool = make_pool(Streamer, hang_timeout=0.5, stream_buffer=4, execution_timeout=BOUND)
    pool.spawn()
    assert len(list(pool.stream("count", 30, 0.05))) == 30  # 1.5 s in all, chunks every 50 ms
    got = []
    for chunk in pool.stream("count", 12):
        got.append(chunk)
        time.sleep(0.1)  # the worker waits for this reader, 1.2 s in all
    assert got == list(range(12))
    assert pool.stats().restarts == 0


def test_a_slow_reader_bounds_what_is_buffered(make_pool, tmp_path):
    pool = make_pool(Streamer, stream_buffer=8, execution_timeout=BOUND)
    pool.spawn(marker_dir=str(tmp_path))
    progress = tmp_path / "g"
    stream = pool.stream("progress", "g", 10_000)
    for expected in range(30):
        assert next(stream) == expected
        time.sleep(0.02)
        # The generator never runs more than stream_buffer chunks ahead of the reader.
        assert int(progress.read_text() or 0) <= expected + 1 + 8 + 1
    time.sleep(0.3)
    assert int(progress.read_text()) <= 30 + 8 + 1
    stream.close()


def test_sigkill_mid_stream_gives_the_chunks_then_worker_crashed(pool):
    first_pid = pool.execute("pid")
    got = []
    with pytest.raises(WorkerCrashedError) as info:
        for chunk in pool.stream("sigkill_after", 5):
            got.append(chunk)
    assert got == [0, 1, 2, 3, 4]
    assert info.value.exitcode == -9
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=BOUND)
    assert pool.execute("pid") != first_pid
    assert list(pool.stream("count", 3)) == [0, 1, 2]


def test_exception_mid_stream_comes_after_the_chunks_with_the_worker_traceback(pool):
    got = []
    with pytest.raises(ValueError, match="failed after 3") as info:
        for chunk in pool.stream("raise_after", 3):
            got.append(chunk)
    assert got == [0, 1, 2]
    assert "do_raise_after" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="failed after 2"):
        pool.execute("raise_after", 2)
    assert list(pool.stream("count", 2)) == [0, 1]


def test_an_unpicklable_chunk_fails_that_stream_alone(pool):
    got = []
    with pytest.raises(RemoteError, match="chunk could not be pickled"):
        for chunk in pool.stream("unpicklable_after", 2):
            got.append(chunk)
    assert got == [0, 1]
    assert list(pool.stream("count", 3)) == [0, 1, 2]
    assert pool.stats().restarts == 0


def test_streaming_a_worker_that_does_not_yield_is_a_type_error(pool):
    with pytest.raises(TypeError, match="not a generator"):
        list(pool.stream("not_a_generator"))


def test_more_streams_than_the_queue_holds(make_pool):
    pool = make_pool(Streamer, queue_size=2, execution_timeout=BOUND)
    pool.spawn()

    async def main():
        async def one(i):
            return [c async for c in pool.async_stream("count", 20, 0.001)]

        return await asyncio.gather(*(one(i) for i in range(12)))

    assert asyncio.run(asyncio.wait_for(main(), BOUND)) == [list(range(20))] * 12
    streams = [pool.stream("count", 5) for _ in range(3)]  # threads wait for room
    assert [list(s) for s in streams] == [list(range(5))] * 3


def test_a_dropped_queued_stream_never_runs(make_pool, tmp_path):
    pool = make_pool(Streamer, execution_timeout=BOUND)
    pool.spawn(marker_dir=str(tmp_path))
    busy = pool.submit_execute("count", 3, 0.3)
    queued = pool.stream("tracked", "never", 3)
    queued.close()
    assert busy.result(timeout=BOUND) == [0, 1, 2]
    assert pool.execute("report", "never") == {"closed": False, "steps": None}
    assert not os.path.exists(tmp_path / "never")


STREAM_PROGRAM = textwrap.dedent("""
    import asyncio
    from stateful_pool import SPool, SWorker

    class Words(SWorker):
        def execute(self, text):
            try:
                for word in text.split():
                    yield word.upper()
            finally:
                self.closed = True

        def spawn(self):
            self.closed = False

    async def main(pool):
        return [w async for w in pool.async_stream("d e")]

    with SPool(Words, execution_timeout=30) as pool:
        pool.spawn()
        print(" ".join(pool.stream("a b c")), " ".join(asyncio.run(main(pool))), flush=True)
""")


def test_a_streaming_worker_defined_in_python_dash_c():
    out = subprocess.run([sys.executable, "-c", STREAM_PROGRAM], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["A", "B", "C", "D", "E"]


# Readers that take some chunks and then read on, break, close, or are cancelled.
_reader_plan = st.lists(st.tuples(st.sampled_from(["all", "break", "cancel_async"]),
                                  st.integers(0, 60), st.integers(0, 60)),
                        min_size=1, max_size=6)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=_reader_plan)
def test_chunks_arrive_complete_and_in_order_for_any_mix_of_readers(shared_pool, plan):
    """Whatever the readers do to their own streams, every chunk a reader gets is the next one
    of its stream, a stream read to its end has them all, and the worker serves on."""

    def sync_reader(how, n, stop_at):
        got = []
        for chunk in shared_pool.stream("count", n):
            got.append(chunk)
            if how == "break" and len(got) >= stop_at:
                break
        assert got == list(range(len(got)))
        if how == "all":
            assert len(got) == n

    async def async_reader(n, stop_at):
        got = []

        async def read():
            async for chunk in shared_pool.async_stream("count", n, 0.001):
                got.append(chunk)

        task = asyncio.create_task(read())
        while len(got) < min(stop_at, n) and not task.done():
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert got == list(range(len(got)))

    async def main():
        jobs = []
        for how, n, stop_at in plan:
            if how == "cancel_async":
                jobs.append(async_reader(n, stop_at))
            else:
                jobs.append(asyncio.to_thread(sync_reader, how, n, stop_at))
        await asyncio.gather(*jobs)

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert shared_pool.execute("count", 3) == [0, 1, 2]


@pytest.fixture(scope="module")
def _module_pool():
    from stateful_pool import SPool

    pool = SPool(Streamer, execution_timeout=BOUND, stream_buffer=8)
    pool.spawn()
    pool.spawn()
    yield pool
    pool.shutdown(cancel_futures=True, timeout=5)


@pytest.fixture
def shared_pool(_module_pool):
    return _module_pool
