"""Dynamic batching: the pure batch-forming rule (virtual clock), then real batches."""

from __future__ import annotations

import asyncio
import time

import pytest
from workers import Batcher, Echo

from stateful_pool import SPool, TaskTimeoutError, WorkerCrashedError
from stateful_pool._batching import BatchCounter, PendingQueue

# ---- the rule, without processes or sleeps ------------------------------------------------


def test_full_batch_goes_at_once():
    q = PendingQueue(max_batch_size=3, max_batch_wait=10.0)
    for i in range(7):
        q.push(i, f"t{i}", now=100.0)
    assert q.next_batch(now=100.0) == ["t0", "t1", "t2"]
    assert q.next_batch(now=100.0) == ["t3", "t4", "t5"]
    assert q.next_batch(now=100.0) == []  # one left, its window still open
    assert q.due_at() == 110.0
    assert q.next_batch(now=110.0) == ["t6"]


def test_partial_batch_waits_at_most_max_batch_wait_from_its_oldest_task():
    q = PendingQueue(max_batch_size=8, max_batch_wait=0.005)
    q.push(1, "a", now=1.000)
    q.push(2, "b", now=1.004)
    assert q.next_batch(now=1.0049) == []
    assert q.due_at() == pytest.approx(1.005)
    assert q.next_batch(now=1.005) == ["a", "b"]


def test_zero_wait_takes_what_is_queued():
    q = PendingQueue(max_batch_size=8, max_batch_wait=0.0)
    q.push(1, "a", now=5.0)
    assert q.next_batch(now=5.0) == ["a"]
    assert q.next_batch(now=5.0) == []
    assert q.due_at() is None


def test_unbatched_queue_never_holds():
    q = PendingQueue()
    q.push(1, "a", now=0.0)
    q.push(2, "b", now=0.0)
    assert q.next_batch(now=0.0) == ["a"]
    assert q.next_batch(now=0.0) == ["b"]


def test_removed_tasks_never_enter_a_batch_and_the_window_follows_the_oldest_left():
    q = PendingQueue(max_batch_size=4, max_batch_wait=1.0)
    q.push(1, "cancelled", now=0.0)
    q.push(2, "kept", now=0.5)
    assert q.remove(1) == "cancelled"
    assert q.remove(1) is None
    assert q.due_at() == 1.5
    assert q.next_batch(now=1.0) == []
    assert q.next_batch(now=1.5) == ["kept"]


def test_batch_counter():
    c = BatchCounter()
    for size in (1, 4, 4, 8):
        c.record(size)
    assert (c.batches, c.largest, c.mean, c.histogram) == (4, 8, 4.25, {1: 1, 4: 2, 8: 1})


def test_invalid_settings():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        PendingQueue(max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_wait must be >= 0"):
        PendingQueue(max_batch_wait=-1)


# ---- real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_pool():
    pool = SPool(Batcher, max_batch_size=16, max_batch_wait=0.02)
    pool.spawn(cost_s=0.02)
    pool.spawn(cost_s=0.02)
    yield pool
    pool.shutdown()


def test_concurrent_callers_are_batched_and_each_gets_its_own_result(batch_pool):
    async def main():
        return await asyncio.gather(*(batch_pool.async_execute(("echo", i)) for i in range(64)))

    before = batch_pool.stats().batches
    results = asyncio.run(asyncio.wait_for(main(), 30))
    assert [value for value, _pid in results] == list(range(64))
    stats = batch_pool.stats()
    assert stats.batches - before < 64 / 2, "tasks were not grouped"
    assert stats.batch_size_max > 1 and stats.batch_size_max <= 16
    seen = batch_pool.execute(("sizes", None))
    assert max(seen) > 1  # the worker itself saw real batches


def test_lone_task_is_held_no_longer_than_max_batch_wait():
    with SPool(Batcher, max_batch_size=8, max_batch_wait=0.3) as pool:
        pool.spawn()
        pool.execute(("echo", "warm"))
        t0 = time.monotonic()
        assert pool.execute(("echo", 1))[0] == 1
        elapsed = time.monotonic() - t0
    assert 0.28 <= elapsed < 1.0


def test_execute_batch_exception_fails_every_task_of_that_batch_with_its_own_instance(batch_pool):
    futures = [batch_pool.submit_execute(("raise_all", i)) for i in range(6)]
    errors = [f.exception(timeout=10) for f in futures]
    assert all(isinstance(e, ValueError) for e in errors)
    assert len({id(e) for e in errors}) == 6
    assert "execute_batch" in str(errors[0].__cause__)


def test_exception_instance_in_place_of_an_item_fails_only_that_item(batch_pool):
    items = [("echo", 0), ("bad_item", 1), ("echo", 2)]
    futures = [batch_pool.submit_execute(item) for item in items]
    assert futures[0].result(timeout=10)[0] == 0
    with pytest.raises(ValueError, match="bad item 1"):
        futures[1].result(timeout=10)
    assert futures[2].result(timeout=10)[0] == 2


def test_wrong_length_result_is_a_clear_error_for_the_batch(batch_pool):
    with pytest.raises(TypeError, match=r"returned 0 results for a batch of 1 items"):
        batch_pool.execute(("wrong_length", None))
    assert batch_pool.execute(("echo", "fine"))[0] == "fine"


def test_batching_requires_exactly_one_positional_argument(batch_pool):
    with pytest.raises(TypeError, match="exactly one positional argument"):
        batch_pool.submit_execute("a", "b")
    with pytest.raises(TypeError, match="exactly one positional argument"):
        batch_pool.submit_execute(("echo", 1), flag=True)


def test_crash_mid_batch_fails_exactly_that_batch(make_pool):
    pool = make_pool(Batcher, max_batch_size=8, max_batch_wait=0.1)
    pool.spawn(cost_s=0.2)
    doomed = [pool.submit_execute(("echo", i)) for i in range(3)]
    doomed.append(pool.submit_execute(("crash", None)))
    time.sleep(0.05)  # the window is still open: these join the same batch
    time.sleep(0.15)
    later = [pool.submit_execute(("echo", i)) for i in range(3)]  # queued behind it
    for f in doomed:
        with pytest.raises(WorkerCrashedError):
            f.result(timeout=10)
    assert [f.result(timeout=10)[0] for f in later] == [0, 1, 2]
    assert pool.stats().failed == 4


def test_cancelled_and_expired_tasks_never_enter_a_batch(make_pool):
    pool = make_pool(Batcher, max_batch_size=8, max_batch_wait=0.0, execution_timeout=0.4)
    pool.spawn(cost_s=0.8)
    blocker = pool.submit_execute(("echo", "blocker"))
    time.sleep(0.1)
    cancelled = pool.submit_execute(("echo", "cancelled"))
    expiring = pool.submit_execute(("echo", "expiring"))
    assert cancelled.cancel()
    with pytest.raises(TaskTimeoutError, match="before it started"):
        expiring.result(timeout=5)
    with pytest.raises(TaskTimeoutError):
        blocker.result(timeout=5)
    sizes = pool.execute(("sizes", None))
    # The batch after the blocker held only the "sizes" task itself.
    assert sizes == [1, 1]


def test_worker_without_execute_batch_is_not_batched(make_pool):
    pool = make_pool(Echo, max_batch_size=8)
    pool.spawn()
    assert pool.execute(1, y=2) == (1, {"y": 2})
    assert pool.stats().batches == 0
