"""An event loop that awaits tasks drives the pool: it queues, dispatches and reads the
workers' answers itself. Seen from the user's side nothing else changes, and nothing waits on a
loop that does not run: a blocked loop, a closed one, a done-callback on the loop that waits
for the pool, two loops and threads at once while workers are killed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import wait

import pytest
from procs import run_async
from workers import Tasks

from stateful_pool import WorkerCrashedError

WAIT = 30.0  # the longest any wait below may take


def test_a_blocked_loop_does_not_hold_the_answers_of_other_callers(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    pool.spawn()
    driving = threading.Event()
    release = threading.Event()

    async def drive_then_block():
        assert await asyncio.gather(*(pool.async_execute("echo", i) for i in range(50))) \
            == list(range(50))
        driving.set()
        release.wait(WAIT)  # a handler that blocks its event loop (a sync call, a sleep)

    loop_thread = threading.Thread(target=run_async, args=(drive_then_block(),))
    loop_thread.start()
    try:
        assert driving.wait(WAIT)
        t0 = time.monotonic()
        futures = [pool.submit_execute("sleep", 0.01, i) for i in range(20)]
        done, _ = wait(futures, timeout=5)
        elapsed = time.monotonic() - t0
        assert [f.result() for f in futures] == list(range(20))
        # 20 tasks of 10 ms on 2 workers, plus the time to notice that the loop stalled.
        assert elapsed < 2.0, elapsed
        assert pool.execute("echo", "after") == "after"
    finally:
        release.set()
        loop_thread.join(WAIT)
    assert not loop_thread.is_alive()
    assert run_async(pool.async_execute("echo", "again")) == "again"


def test_the_pool_outlives_the_loops_that_drove_it(make_pool):
    pool = make_pool(Tasks, queue_size=4)
    pool.spawn()
    pool.spawn()

    async def burst(base):
        # More callers than the queue holds: the excess waits for room.
        return await asyncio.gather(*(pool.async_execute("echo", base + i) for i in range(40)))

    for round_ in range(5):
        assert run_async(burst(100 * round_)) == [100 * round_ + i for i in range(40)]
        # The loop is closed now; threads go on.
        assert pool.execute("echo", round_) == round_
        futures = [pool.submit_execute("echo", i) for i in range(10)]
        done, _ = wait(futures, timeout=WAIT)
        assert len(done) == 10 and [f.result() for f in futures] == list(range(10))
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.in_flight, stats.queue_depth) == (255, 0, 0, 0)


def test_a_loop_closed_while_its_tasks_run_leaves_the_workers_to_others(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    pool.spawn()

    async def leave_early():
        for i in range(2):
            asyncio.ensure_future(pool.async_execute("sleep", 0.3, i))
        await asyncio.sleep(0.05)  # both run now; asyncio.run cancels them on its way out

    asyncio.run(leave_early())
    t0 = time.monotonic()
    assert [f.result(WAIT) for f in [pool.submit_execute("echo", i) for i in range(4)]] \
        == list(range(4))
    assert time.monotonic() - t0 < 2.0


def test_a_done_callback_on_the_driving_loop_cannot_wait_for_the_pool(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    seen = []

    def callback(future):
        try:
            seen.append(pool.execute("echo", "nested"))
        except RuntimeError as exc:
            seen.append(exc)

    async def main():
        assert await pool.async_execute("echo", 0) == 0  # this loop drives the pool
        future = pool.submit_execute("sleep", 0.05, 1)
        future.add_done_callback(callback)
        assert await asyncio.wrap_future(future) == 1
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        return await pool.async_execute("echo", 2)

    assert run_async(main()) == 2
    assert len(seen) == 1
    # Where the callback ran (this loop, or the dispatcher thread), it could not wait there.
    assert isinstance(seen[0], RuntimeError) and "cannot wait here" in str(seen[0])


def test_one_loop_drives_two_pools(make_pool):
    first, second = make_pool(Tasks), make_pool(Tasks, max_batch_size=1)
    first.spawn()
    second.spawn()
    second.spawn()

    async def main():
        a = [first.async_execute("echo", i) for i in range(100)]
        b = [second.async_execute("echo", -i) for i in range(100)]
        return await asyncio.gather(*a), await asyncio.gather(*b)

    a, b = run_async(main())
    assert a == list(range(100)) and b == [-i for i in range(100)]


def test_loops_and_threads_at_once_while_workers_are_killed(make_pool):
    pool = make_pool(Tasks, max_restarts=None, restart_backoff=0.01)
    for _ in range(3):
        pool.spawn()
    stop = threading.Event()
    results: dict[str, list] = {}

    def tally(name, outcomes):
        results[name] = outcomes

    def loop_caller(name, base):
        async def main():
            out = []
            for start in range(0, 150, 30):
                got = await asyncio.gather(
                    *(pool.async_execute("echo", base + start + i) for i in range(30)),
                    return_exceptions=True)
                out.extend(got)
            return out
        tally(name, run_async(main()))

    def thread_caller(name, base):
        out = []
        for i in range(100):
            try:
                out.append(pool.execute("echo", base + i) if i % 2 else
                           pool.submit_execute("echo", base + i).result(WAIT))
            except WorkerCrashedError as exc:
                out.append(exc)
        tally(name, out)

    def killer():
        while not stop.wait(0.05):
            pids = [w.pid for w in pool.stats().workers if w.pid and w.state == "busy"]
            if pids:
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass

    callers = {"loop-a": (loop_caller, 0), "loop-b": (loop_caller, 10_000),
               "thread-a": (thread_caller, 20_000), "thread-b": (thread_caller, 30_000)}
    threads = [threading.Thread(target=fn, args=(name, base)) for name, (fn, base)
               in callers.items()]
    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    stop.set()
    kill_thread.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    crashed = 0
    for name, (_, base) in callers.items():
        outcomes = results[name]
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, WorkerCrashedError), outcome
                crashed += 1
            else:
                assert outcome == base + i  # each caller gets its own answer, never another's
    total = sum(len(v) for v in results.values())
    assert total == 500
    assert crashed < total  # the workers were restarted and served on
    assert pool.execute("echo", "end") == "end"
    assert pool.stats().in_flight == 0


def test_a_cancelled_coroutine_takes_its_queued_task_off_the_queue(make_pool, tmp_path):
    pool = make_pool(Tasks)
    pool.spawn(marker_dir=str(tmp_path))

    async def main():
        blocker = asyncio.ensure_future(pool.async_execute("sleep", 0.3, "first"))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(pool.async_execute("mark", f"q{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        for task in queued:
            task.cancel()
        assert await blocker == "first"
        assert await pool.async_execute("mark", "after") == "after"
        for task in queued:
            with pytest.raises(asyncio.CancelledError):
                await task

    run_async(main())
    assert sorted(os.listdir(tmp_path)) == ["after"]
    assert pool.stats().cancelled == 5


def test_a_blocking_call_inside_a_coroutine_is_answered_at_once(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()

    async def main():
        assert await pool.async_execute("echo", 0) == 0  # this loop drives the pool
        busy = asyncio.ensure_future(pool.async_execute("sleep", 0.2, "busy"))
        await asyncio.sleep(0.02)
        t0 = time.monotonic()
        # A mistake users make: a blocking call in async code, behind a running task.
        assert pool.execute("echo", "blocking") == "blocking"
        waited = time.monotonic() - t0
        assert await busy == "busy"
        return waited

    waited = run_async(main())
    assert waited < 0.35, waited  # the running task's 0.2 s, not a stall of the loop on top


def test_deadlines_of_a_driving_loops_tasks_are_kept_queued_or_running(make_pool):
    from stateful_pool import TaskTimeoutError

    pool = make_pool(Tasks)
    pool.spawn()

    async def main():
        assert await pool.async_execute("echo", 0) == 0  # this loop drives the pool
        t0 = time.monotonic()
        running = asyncio.ensure_future(pool.with_timeout(0.3).async_execute("sleep", 2.0))
        await asyncio.sleep(0.02)
        queued = [asyncio.ensure_future(pool.with_timeout(0.15).async_execute("echo", i))
                  for i in range(5)]
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        queued_at = time.monotonic() - t0
        with pytest.raises(TaskTimeoutError, match="while running"):
            await running
        running_at = time.monotonic() - t0
        return outcomes, queued_at, running_at

    outcomes, queued_at, running_at = run_async(main())
    assert all(isinstance(o, TaskTimeoutError) and "before it started" in str(o)
               for o in outcomes), outcomes
    assert queued_at < 1.0 and running_at < 1.5  # at their deadlines, not the task's 2 s
    assert pool.stats().timed_out == 6
