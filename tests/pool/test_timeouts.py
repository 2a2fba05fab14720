"""Deadlines, backpressure and cancellation."""

from __future__ import annotations

import asyncio
import math
import queue
import time

import pytest
from workers import Tasks

from stateful_pool import QueueFullError, TaskTimeoutError


def test_execution_timeout_raises_a_timeout_error_at_the_deadline(make_pool):
    pool = make_pool(Tasks, execution_timeout=0.5)
    pool.spawn()
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError) as info:
        pool.execute("sleep", 3)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert 0.45 <= elapsed < 1.5
    assert "while running" in str(info.value)


def test_task_that_times_out_before_starting_never_runs(make_pool, tmp_path):
    pool = make_pool(Tasks, execution_timeout=0.4)
    pool.spawn(marker_dir=str(tmp_path))
    blocker = pool.submit_execute("sleep", 0.8, "blocker")
    starved = pool.submit_execute("mark", "starved")
    with pytest.raises(TaskTimeoutError, match="before it started"):
        starved.result(timeout=5)
    with pytest.raises(TaskTimeoutError):
        blocker.result(timeout=5)
    # The worker finishes the blocker, then is free; the starved task was dropped.
    time.sleep(0.6)
    assert pool.execute("mark", "later") == "later"
    assert not (tmp_path / "starved").exists()
    assert pool.stats().timed_out == 2


def test_queue_full_past_submission_timeout(make_pool):
    pool = make_pool(Tasks, queue_size=2, submission_timeout=0.2)
    pool.spawn()
    running = pool.submit_execute("sleep", 1.0, "r")
    time.sleep(0.2)  # let the worker take it; the queue is empty again
    waiting = [pool.submit_execute("echo", i) for i in range(2)]
    t0 = time.monotonic()
    with pytest.raises(QueueFullError) as info:
        pool.submit_execute("echo", "one too many")
    assert isinstance(info.value, queue.Full)  # what stateful-pool 0.3.2 raised
    assert 0.15 <= time.monotonic() - t0 < 1.0
    assert running.result(timeout=5) == "r"
    assert [f.result(timeout=5) for f in waiting] == [0, 1]
    # Room again: submits are accepted.
    assert pool.execute("echo", "room") == "room"


def test_full_queue_waits_for_room_when_it_comes_in_time(make_pool):
    pool = make_pool(Tasks, queue_size=1, submission_timeout=5)
    pool.spawn()
    pool.submit_execute("sleep", 0.3, None)
    time.sleep(0.1)
    pool.submit_execute("echo", 1)
    t0 = time.monotonic()
    assert pool.submit_execute("echo", 2).result(timeout=5) == 2
    assert time.monotonic() - t0 >= 0.1


def test_async_queue_full_does_not_block_the_loop(make_pool):
    pool = make_pool(Tasks, queue_size=1, submission_timeout=0.3)
    pool.spawn()

    async def main():
        running = asyncio.ensure_future(pool.async_execute("sleep", 1.0, "r"))
        await asyncio.sleep(0.2)
        queued = asyncio.ensure_future(pool.async_execute("echo", 1))
        await asyncio.sleep(0.05)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        with pytest.raises(QueueFullError):
            await pool.async_execute("echo", "too many")
        t.cancel()
        assert ticks >= 10  # the loop kept running while the submit waited
        return await running, await queued

    assert asyncio.run(asyncio.wait_for(main(), 10)) == ("r", 1)


def test_cancelled_future_leaves_the_queue_and_never_runs(make_pool, tmp_path):
    pool = make_pool(Tasks, queue_size=2, submission_timeout=0)
    pool.spawn(marker_dir=str(tmp_path))
    blocker = pool.submit_execute("sleep", 0.5, "b")
    time.sleep(0.15)
    doomed = pool.submit_execute("mark", "cancelled")
    other = pool.submit_execute("mark", "kept")
    assert doomed.cancel()
    assert pool.stats().queue_depth <= 1
    # Its place in the queue is free again at once.
    third = pool.submit_execute("echo", 3)
    assert blocker.result(timeout=5) == "b"
    assert other.result(timeout=5) == "kept" and third.result(timeout=5) == 3
    assert not (tmp_path / "cancelled").exists()
    assert pool.stats().cancelled == 1


def test_cancelling_an_awaiting_asyncio_task_removes_the_queued_task(make_pool, tmp_path):
    pool = make_pool(Tasks)
    pool.spawn(marker_dir=str(tmp_path))

    async def main():
        blocker = asyncio.ensure_future(pool.async_execute("sleep", 0.5, "b"))
        await asyncio.sleep(0.15)
        doomed = asyncio.ensure_future(pool.async_execute("mark", "cancelled"))
        await asyncio.sleep(0.05)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await blocker

    assert asyncio.run(asyncio.wait_for(main(), 10)) == "b"
    assert pool.execute("echo", "after") == "after"
    assert not (tmp_path / "cancelled").exists()
    assert pool.stats().cancelled == 1


def test_running_task_cannot_be_cancelled(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    f = pool.submit_execute("sleep", 0.3, "done")
    time.sleep(0.1)
    assert not f.cancel()
    assert f.result(timeout=5) == "done"


def test_execution_timeout_also_applies_to_async(make_pool):
    pool = make_pool(Tasks, execution_timeout=0.3)
    pool.spawn()

    async def main():
        with pytest.raises(TimeoutError):
            await pool.async_execute("sleep", 2)

    asyncio.run(asyncio.wait_for(main(), 5))


def test_with_timeout_gives_one_call_its_own_deadline(make_pool, tmp_path):
    """A request deadline: the queued task whose deadline passes never reaches a worker."""
    pool = make_pool(Tasks, execution_timeout=30)
    pool.spawn(marker_dir=str(tmp_path))
    blocker = pool.submit_execute("sleep", 0.6)
    late = pool.with_timeout(0.2).submit_execute("mark", "late")
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match="before it started"):
        late.result(timeout=5)
    assert 0.15 < time.monotonic() - t0 < 0.5
    blocker.result(timeout=5)
    assert pool.execute("echo", "after") == "after"
    assert not (tmp_path / "late").exists()
    # None lifts the pool's timeout; an invalid one is refused before anything is queued.
    assert pool.with_timeout(None).execute("sleep", 0.05, "ok") == "ok"
    with pytest.raises(ValueError, match="timeout must be None or > 0"):
        pool.with_timeout(0)


def test_with_timeout_counts_the_wait_for_room_in_a_full_queue(make_pool):
    pool = make_pool(Tasks, queue_size=1)
    pool.spawn()
    pool.submit_execute("sleep", 1.0)
    time.sleep(0.2)
    pool.submit_execute("echo", "fills the queue")

    async def main():
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError, match="waiting for room"):
            await pool.with_timeout(0.3).async_execute("echo", "no room")
        return time.monotonic() - t0

    assert 0.25 < asyncio.run(main()) < 0.8
    assert pool._capacity.used <= 1


def test_a_batch_never_carries_an_expired_item(make_pool):
    from workers import Batcher

    pool = make_pool(Batcher, max_batch_size=8)
    pool.spawn(cost_s=0.5)
    first = pool.submit_execute(("echo", "first"))
    time.sleep(0.1)  # the first batch runs; the next ones queue behind it
    expiring = [pool.with_timeout(0.2).submit_execute(("echo", f"x{i}")) for i in range(3)]
    kept = [pool.submit_execute(("echo", f"k{i}")) for i in range(3)]
    assert first.result(timeout=5)[0] == "first"
    assert [f.result(timeout=5)[0] for f in kept] == ["k0", "k1", "k2"]
    for f in expiring:
        with pytest.raises(TaskTimeoutError, match="before it started"):
            f.result(timeout=0)
    sizes = pool.execute(("sizes", None))
    assert sizes[:2] == [1, 3], sizes  # the second batch held the three kept items only


def test_finished_tasks_do_not_wait_in_the_deadline_heap(make_pool):
    """With a long timeout, finished tasks (and their results) must not stay alive until
    their deadline: the heap is pruned as it grows."""
    import gc

    pool = make_pool(Tasks, execution_timeout=600)
    pool.spawn()
    futures = [pool.submit_execute("echo", b"x" * 1000) for _ in range(5000)]
    for f in futures:
        f.result(timeout=30)
    del futures
    pool.execute("echo", 1)  # one more round of the dispatcher
    gc.collect()
    assert len(pool._dispatcher.deadlines) <= 2048


@pytest.mark.parametrize("timeout", [3_000_000, math.inf])  # about 35 days; never
def test_a_deadline_weeks_away_does_not_stop_the_dispatcher(make_pool, timeout):
    """poll() takes its timeout as a C int of milliseconds (24.8 days at most): a longer
    sleep must not overflow it and stop the pool."""
    pool = make_pool(Tasks, execution_timeout=timeout, queue_size=1,
                     submission_timeout=timeout)
    pool.spawn()
    assert pool.execute("echo", 1) == 1
    # More callers than the queue holds: they wait for room with that same long timeout.
    futures = [pool.submit_execute("sleep", 0.1, i) for i in range(3)]
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2]
    assert pool.execute("echo", 2) == 2
