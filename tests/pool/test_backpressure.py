"""A bounded queue (``queue_size``) with more callers than it holds, as user programs do it:
asyncio servers with more concurrent requests than the queue, threads and coroutines at once,
several event loops on one pool, callers that give up."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workers import Echo, Tasks

from stateful_pool import QueueFullError, SPool


def test_many_async_callers_over_a_small_queue_finish_quickly(make_pool):
    """The server pattern: far more concurrent requests than queue_size. Waking every waiter
    on every freed place made this quadratic: 5,000 callers over 100 places took over a
    minute; handing each freed place to one waiter takes about a second."""
    pool = make_pool(Echo, queue_size=100)
    pool.spawn()
    pool.spawn()
    n = 5000

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(pool.async_execute(i) for i in range(n))), timeout=20)

    assert asyncio.run(main()) == list(range(n))
    assert pool._capacity.used == 0


def test_waiters_get_their_place_in_arrival_order(make_pool):
    """queue_size=1, one worker held busy: callers that arrive one after the other start in
    that order, whether they are threads or coroutines."""
    pool = make_pool(Tasks, queue_size=1)
    pool.spawn()
    blocker = pool.submit_execute("sleep", 0.5)
    deadline = time.monotonic() + 5
    while pool.stats().busy_workers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    first_in_queue = pool.submit_execute("started_at", 0.0)  # fills the only place
    order: list[tuple[str, float]] = []
    lock = threading.Lock()

    def thread_caller(name):
        start = pool.execute("started_at", 0.0)
        with lock:
            order.append((name, start))

    async def async_caller(name):
        start = await pool.async_execute("started_at", 0.0)
        with lock:
            order.append((name, start))

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    threads, futures = [], []
    for i in range(6):
        name = f"c{i}"
        if i % 2:
            futures.append(asyncio.run_coroutine_threadsafe(async_caller(name), loop))
        else:
            t = threading.Thread(target=thread_caller, args=(name,))
            t.start()
            threads.append(t)
        time.sleep(0.05)  # arrival order is the order of the loop
    try:
        for t in threads:
            t.join(timeout=10)
            assert not t.is_alive()
        for f in futures:
            f.result(timeout=10)
        blocker.result(timeout=5)
        first_in_queue.result(timeout=5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
        loop.close()
    by_start = [name for name, _ in sorted(order, key=lambda x: x[1])]
    assert by_start == [f"c{i}" for i in range(6)]


def test_submission_timeout_fails_the_excess_within_the_timeout(make_pool):
    pool = make_pool(Tasks, queue_size=2, submission_timeout=0.3)
    pool.spawn()
    pool.submit_execute("sleep", 2.0)
    deadline = time.monotonic() + 5
    while pool.stats().busy_workers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()

    async def call(i):
        try:
            return await pool.async_execute("echo", i)
        except QueueFullError as exc:
            return exc, time.monotonic() - t0

    async def main():
        return await asyncio.gather(*(call(i) for i in range(20)))

    results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, tuple)]
    assert len(failed) == 18  # two got a place behind the sleeper, the rest gave up
    assert all("queue is full" in str(exc) and 0.3 <= after < 1.0 for exc, after in failed)
    assert sorted(r for r in results if not isinstance(r, tuple)) == [0, 1]
    assert pool.stats().queue_depth == 0 and pool._capacity.used == 0


def test_threads_and_two_event_loops_share_one_bounded_pool(make_pool):
    pool = make_pool(Echo, queue_size=4)
    pool.spawn()
    pool.spawn()
    results: dict[str, list] = {}

    def thread_caller(name):
        results[name] = [pool.execute((name, i)) for i in range(100)]

    def loop_caller(name):
        async def main():
            return await asyncio.gather(*(pool.async_execute((name, i)) for i in range(300)))
        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=thread_caller, args=(f"t{i}",)) for i in range(4)]
    threads += [threading.Thread(target=loop_caller, args=(f"loop{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a caller is stuck on the bounded queue"
    for name, got in results.items():
        n = 300 if name.startswith("loop") else 100
        assert got == [(name, i) for i in range(n)]
    assert pool._capacity.used == 0


def test_a_cancelled_waiter_does_not_swallow_the_place(make_pool):
    """Waiters that give up (cancelled, timed out) must pass on any place granted to them."""
    pool = make_pool(Tasks, queue_size=1)
    pool.spawn()

    async def main():
        blocker = asyncio.ensure_future(pool.async_execute("sleep", 0.3))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(pool.async_execute("echo", "queued"))
        await asyncio.sleep(0.02)
        quitters = [asyncio.ensure_future(pool.async_execute("echo", f"q{i}"))
                    for i in range(20)]
        stayer = asyncio.ensure_future(pool.async_execute("echo", "stayer"))
        await asyncio.sleep(0.05)
        for q in quitters:
            q.cancel()
        return await asyncio.wait_for(asyncio.gather(blocker, queued, stayer), timeout=10)

    assert asyncio.run(main()) == [None, "queued", "stayer"]
    assert pool._capacity.used == 0


_caller = st.tuples(
    st.sampled_from(["thread", "async"]),
    st.sampled_from(["stays", "times_out", "cancels"]),
)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(callers=st.lists(_caller, min_size=1, max_size=24),
       queue_size=st.sampled_from([1, 3]))
def test_no_wakeup_is_lost_for_any_mix_of_callers(shared_echo_pool_factory, callers,
                                                  queue_size):
    """For any mix of thread and asyncio callers, some of which give up: every caller that
    stays gets its own result, and every place of the queue is free at the end."""
    pool = shared_echo_pool_factory(queue_size)
    stays: dict[int, object] = {}
    errors: list[BaseException] = []
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()

    async def async_call(i, how):
        if how == "times_out":
            try:
                await asyncio.wait_for(pool.async_execute(("slow", i)), timeout=0.001)
            except TimeoutError:
                pass
            return
        task = asyncio.ensure_future(pool.async_execute(("slow", i)))
        if how == "cancels":
            await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return
        stays[i] = await task

    def thread_call(i, how):
        try:
            if how == "stays":
                stays[i] = pool.execute(("slow", i))
            else:
                f = pool.submit_execute(("slow", i))
                f.cancel()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads, futures = [], []
    expected = set()
    for i, (kind, how) in enumerate(callers):
        if how == "stays":
            expected.add(i)
        if kind == "thread":
            t = threading.Thread(target=thread_call, args=(i, how))
            t.start()
            threads.append(t)
        else:
            futures.append(asyncio.run_coroutine_threadsafe(async_call(i, how), loop))
    try:
        for t in threads:
            t.join(timeout=20)
            assert not t.is_alive(), "a thread caller is stuck"
        for f in futures:
            f.result(timeout=20)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
        loop.close()
    assert not errors
    assert set(stays) == expected
    assert all(stays[i] == ("slow", i) for i in expected)
    assert pool._capacity.used == 0 or _wait_free(pool)


def _wait_free(pool) -> bool:
    deadline = time.monotonic() + 5
    while pool._capacity.used and time.monotonic() < deadline:
        time.sleep(0.01)
    return pool._capacity.used == 0


@pytest.fixture(scope="module")
def _echo_pools():
    """One pool per queue size for the whole module, spawned before any test's child-process
    check starts: spawning per hypothesis example would dominate the run."""
    pools = {size: SPool(Echo, queue_size=size) for size in (1, 3)}
    try:
        for pool in pools.values():
            pool.spawn()
        yield pools
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True, timeout=5)


@pytest.fixture
def shared_echo_pool_factory(_echo_pools):
    return _echo_pools.__getitem__
