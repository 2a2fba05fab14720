"""The seed API and its guarantees: spawn once, execute many, futures, asyncio, order."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import Future

import pytest
from workers import Echo, Tasks, check_work_conserving

from stateful_pool import NoWorkersError, SPool, SWorker


@pytest.fixture(scope="module")
def pool():
    """One shared 2-worker pool for the tests that do not break it."""
    p = SPool(Tasks)
    p.spawn(tag="a")
    p.spawn(tag="b")
    yield p
    p.shutdown()


def test_spawn_returns_what_the_worker_spawn_returned(make_pool):
    pool = make_pool(Echo)
    info = pool.spawn(tag="gpu0")
    assert info["tag"] == "gpu0"
    assert info["pid"] != multiprocessing.current_process().pid


def test_execute_passes_args_and_kwargs(make_pool):
    pool = make_pool(Echo)
    pool.spawn()
    assert pool.execute(5) == 5
    assert pool.execute(x=[1, 2], y="z") == ([1, 2], {"y": "z"})


def test_worker_state_lives_across_tasks(pool):
    pids = {pool.execute("pid") for _ in range(20)}
    counts = [pool.execute("count") for _ in range(10)]
    assert len(pids) <= 2
    # Each worker's own counter only grows: state survives between tasks.
    assert max(counts) >= 5


def test_submit_execute_returns_futures_with_results(pool):
    futures = [pool.submit_execute("echo", i) for i in range(200)]
    assert all(isinstance(f, Future) for f in futures)
    assert [f.result(timeout=10) for f in futures] == list(range(200))


def test_both_workers_share_the_work(pool):
    futures = [pool.submit_execute("sleep", 0.05, None) for _ in range(8)]
    for f in futures:
        f.result(timeout=10)
    stats = pool.stats()
    assert all(w.tasks_done > 0 for w in stats.workers)


def test_tasks_start_in_submission_order(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    futures = [pool.submit_execute("started_at", 0.005) for _ in range(12)]
    starts = [f.result(timeout=10) for f in futures]
    assert starts == sorted(starts)
    pool.spawn()
    futures = [pool.submit_execute("started_at", 0.05) for _ in range(12)]
    starts = [f.result(timeout=10) for f in futures]
    # Two workers start tasks i and i+1 together; task i+2 must wait for one of them.
    assert all(starts[i + 2] >= starts[i] + 0.04 for i in range(10))


def test_work_conserving_no_worker_idles_while_tasks_wait(make_pool):
    # One long task must not hold up the short ones queued behind it: the free worker
    # takes them all while the other is busy.
    pool = make_pool(Tasks)
    pool.spawn()
    pool.spawn()
    check_work_conserving(pool, shorts=6, long_s=1.5, wait_s=1.2)


def test_no_thread_is_parked_per_in_flight_task(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    threads_before = threading.active_count()
    futures = [pool.submit_execute("sleep", 0.001, i) for i in range(300)]
    stats = pool.stats()
    assert stats.in_flight > 100  # far more than min(32, cpu + 4), the seed's cap
    assert threading.active_count() <= threads_before
    assert [f.result(timeout=20) for f in futures] == list(range(300))


def test_async_execute_and_spawn():
    async def main():
        async with SPool(Echo) as pool:
            info = await pool.async_spawn(tag="x")
            results = await asyncio.gather(*(pool.async_execute(i) for i in range(500)))
            return info, results, threading.active_count()

    threads_before = threading.active_count()
    info, results, threads_during = asyncio.run(asyncio.wait_for(main(), 60))
    assert info["tag"] == "x"
    assert results == list(range(500))
    # Only the dispatcher thread is added (no thread per awaiting task).
    assert threads_during <= threads_before + 2


def test_execute_with_no_workers_fails_at_once(make_pool):
    pool = make_pool(Echo)
    with pytest.raises(NoWorkersError, match="no live worker"):
        pool.execute(1)
    with pytest.raises(RuntimeError):  # the seed raised RuntimeError; still true
        pool.submit_execute(1)


def test_fork_context_can_be_chosen(make_pool):
    pool = make_pool(Echo, mp_context=multiprocessing.get_context("fork"))
    pool.spawn()
    assert pool.execute("forked") == "forked"


def test_stats_snapshot(pool):
    pool.execute("echo", 1)
    stats = pool.stats()
    assert len(stats.workers) == 2
    assert {w.state for w in stats.workers} <= {"idle", "busy"}
    assert all(w.pid for w in stats.workers)
    assert stats.completed >= 1 and stats.failed >= 0
    assert stats.queue_depth == 0
    assert stats.live_workers == 2
    with pytest.raises(AttributeError):
        stats.completed = 0  # frozen
    # A snapshot, not a live view: later work shows in the next one only.
    done = stats.completed
    pool.execute("echo", 2)
    assert stats.completed == done and pool.stats().completed == done + 1
    assert "workers=2" in repr(pool)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue_size": -1}, "queue_size must be None or >= 0, got -1"),
        ({"execution_timeout": 0}, "execution_timeout must be None or > 0"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_batch_wait": -0.1}, "max_batch_wait must be >= 0"),
        ({"max_restarts": -1}, "max_restarts must be None or >= 0"),
        ({"hang_timeout": -5}, "hang_timeout must be None or > 0"),
    ],
)
def test_bad_options_are_refused_before_anything_spawns(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SPool(Echo, **kwargs)


def test_worker_cls_must_be_an_sworker():
    with pytest.raises(TypeError, match="subclass of SWorker"):
        SPool(object)  # type: ignore[arg-type]


def test_default_sworker_methods():
    class Bare(SWorker):
        pass

    w = Bare()
    assert w.spawn() is None
    with pytest.raises(NotImplementedError):
        w.execute(1)


def test_large_arguments_and_results_cross_intact(pool):
    # Over 64 KiB, blobs travel as frames of their own (see _messages.py).
    blob = bytes(range(256)) * 8192  # 2 MiB
    futures = [pool.submit_execute("echo", blob[i:]) for i in range(4)]
    assert [f.result(timeout=30) for f in futures] == [blob[i:] for i in range(4)]
    assert pool.execute("echo", b"small") == b"small"


def test_large_items_in_a_batch_cross_intact(make_pool):
    from workers import Batcher

    pool = make_pool(Batcher, max_batch_size=4, max_batch_wait=0.05)
    pool.spawn()
    items = [("echo", bytes([i]) * (100_000 * (i % 2) + 10)) for i in range(6)]
    futures = [pool.submit_execute(item) for item in items]
    assert [f.result(timeout=30)[0] for f in futures] == [value for _, value in items]


def test_large_bytes_nested_in_arguments_arrive_intact(make_pool):
    # Large bytes travel out of band (see _messages.dumps_payload); structure and types of
    # everything around them must come through unchanged.
    from workers import Pair

    pool = make_pool(Echo)
    pool.spawn()
    big = [bytes([i]) * 200_000 for i in range(3)]
    arg = {"images": [big[0], big[1]], "meta": ("x", big[2]), "pair": Pair(big[0], 1),
           "mutable": bytearray(big[1])}
    out, kwargs = pool.execute(arg, extra=big[2])
    assert out["images"] == [big[0], big[1]] and type(out["images"]) is list
    assert out["meta"] == ("x", big[2]) and type(out["meta"]) is tuple
    assert out["pair"] == Pair(big[0], 1) and type(out["pair"]).__name__ == "Pair"
    assert out["mutable"] == bytearray(big[1]) and type(out["mutable"]) is bytearray
    assert kwargs == {"extra": big[2]}


def test_large_bytes_results_arrive_intact(pool):
    blob = os.urandom(300_000)
    assert pool.execute("echo", {"a": blob, "b": [blob, b"small"]}) == {"a": blob,
                                                                       "b": [blob, b"small"]}


def test_prefetch_keeps_order_and_results(make_pool):
    pool = make_pool(Tasks, prefetch=2)
    pool.spawn()
    pool.spawn()
    futures = [pool.submit_execute("echo", i) for i in range(500)]
    assert [f.result(timeout=30) for f in futures] == list(range(500))
    big = b"z" * 200_000  # large messages and small ones queued behind them stay in order
    futures = [pool.submit_execute("echo", big if i % 3 == 0 else i) for i in range(30)]
    assert [f.result(timeout=30) for f in futures] == [big if i % 3 == 0 else i
                                                         for i in range(30)]
