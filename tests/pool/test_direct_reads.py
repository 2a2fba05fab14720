"""A caller that waits for its task (``execute``, ``async_execute``) on an idle worker reads
the answer from the worker's pipe itself. Seen from the user's side, nothing else changes:
own results, errors, timeouts, cancellation, crashes, work conservation, threads and several
event loops at once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
from procs import run_async, wait_until
from workers import Tasks

from stateful_pool import RemoteError, SWorker, TaskTimeoutError, WorkerCrashedError

WAIT = 30.0  # the longest any wait below may take


def test_sequential_calls_get_their_own_results_errors_included(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    big = b"x" * (200 * 1024)  # a result too large for the compact message

    async def async_calls():
        for i in range(100):
            assert await pool.async_execute("echo", i) == i
        with pytest.raises(ValueError, match="boom"):
            await pool.async_execute("raise", "boom")
        with pytest.raises(RemoteError):
            await pool.async_execute("unpicklable_result")
        assert await pool.async_execute("echo", big) == big

    for i in range(100):
        assert pool.execute("echo", i) == i
    with pytest.raises(ValueError, match="boom"):
        pool.execute("raise", "boom")
    with pytest.raises(RemoteError):
        pool.execute("unpicklable_result")
    assert pool.execute("echo", big) == big
    run_async(async_calls())
    stats = pool.stats()
    assert (stats.completed, stats.failed, stats.in_flight) == (202, 4, 0)
    assert stats.workers[0].tasks_done == 206


@pytest.mark.parametrize("side", ["thread", "asyncio"])
def test_a_timed_out_call_leaves_its_late_answer_to_nobody(make_pool, side):
    pool = make_pool(Tasks)
    pool.spawn()
    t0 = time.monotonic()
    if side == "thread":
        with pytest.raises(TaskTimeoutError):
            pool.with_timeout(0.2).execute("sleep", 0.8, "late")
    else:
        with pytest.raises(TaskTimeoutError):
            run_async(pool.with_timeout(0.2).async_execute("sleep", 0.8, "late"))
    assert time.monotonic() - t0 < 0.7  # not held until the worker answered
    # The worker answers "late" after the timeout; the next call gets its own answer.
    assert pool.execute("echo", "mine") == "mine"
    assert run_async(pool.async_execute("echo", "ours")) == "ours"
    assert pool.stats().timed_out == 1


def test_cancelled_async_caller_of_a_running_task(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()

    async def main():
        running = asyncio.create_task(pool.async_execute("sleep", 0.5, "unwanted"))
        await asyncio.sleep(0.1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # The pool reads the abandoned answer itself; the worker then serves the next call.
        return await pool.async_execute("echo", 7)

    assert run_async(main()) == 7
    assert pool.stats().in_flight == 0


def test_cancelled_async_callers_of_queued_tasks_never_run(make_pool, tmp_path):
    pool = make_pool(Tasks)
    pool.spawn(marker_dir=str(tmp_path))

    async def main():
        first = asyncio.create_task(pool.async_execute("mark", "first", 0.3))
        await asyncio.sleep(0.05)  # it runs; the next ones queue behind it
        queued = [asyncio.create_task(pool.async_execute("mark", f"q{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        for task in queued:
            task.cancel()
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert await first == "first"
        return await pool.async_execute("mark", "after")

    assert run_async(main()) == "after"
    assert sorted(os.listdir(tmp_path)) == ["after", "first"]
    assert pool.stats().cancelled == 5


@pytest.mark.parametrize("side", ["thread", "asyncio"])
def test_worker_dies_while_its_caller_reads_its_pipe(make_pool, side):
    pool = make_pool(Tasks, restart_backoff=0.01)
    pool.spawn()
    with pytest.raises(WorkerCrashedError):
        if side == "thread":
            pool.execute("sigkill")
        else:
            run_async(pool.async_execute("sigkill"))
    # Respawned under the restart budget; the next call is answered.
    assert pool.execute("echo", 1) == 1
    assert run_async(pool.async_execute("echo", 2)) == 2


def test_tasks_queued_behind_a_caller_that_reads_its_pipe_start_when_it_answers(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    caller = threading.Thread(target=pool.execute, args=("sleep", 0.3))
    caller.start()
    time.sleep(0.05)
    futures = [pool.submit_execute("echo", i) for i in range(5)]
    assert [f.result(timeout=WAIT) for f in futures] == list(range(5))
    caller.join(WAIT)
    assert not caller.is_alive()


def test_a_deadline_while_queued_behind_a_reading_caller(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    holder = threading.Thread(target=pool.execute, args=("sleep", 0.5))
    holder.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeoutError, match="before it started"):
        pool.with_timeout(0.1).execute("echo", 1)
    assert time.monotonic() - t0 < 0.45
    holder.join(WAIT)
    assert pool.execute("echo", 2) == 2


@pytest.mark.slow
def test_threads_and_event_loops_hammer_one_pool_while_workers_are_killed(make_pool):
    pool = make_pool(Tasks, max_restarts=None, restart_backoff=0.01)
    for _ in range(2):
        pool.spawn()
    errors: list[BaseException] = []
    calls = {"ok": 0, "crashed": 0}
    lock = threading.Lock()

    def check(key, get):
        try:
            value = get()
        except WorkerCrashedError:
            with lock:
                calls["crashed"] += 1
            return
        except BaseException as exc:  # anything else is a failure of the pool
            errors.append(exc)
            return
        if value != key:
            errors.append(AssertionError(f"call {key} got {value!r}"))
        with lock:
            calls["ok"] += 1

    def thread_caller(base):
        for i in range(150):
            key = base + i
            check(key, lambda key=key: pool.execute("sleep", random.choice([0, 0, 0.002]), key))

    def loop_caller(base):
        async def one(k):
            for i in range(40):
                key = base + k * 1000 + i
                try:
                    value = await pool.async_execute("echo", key)
                except WorkerCrashedError:
                    with lock:
                        calls["crashed"] += 1
                    continue
                check(key, lambda value=value: value)

        async def main():
            await asyncio.gather(*(one(k) for k in range(8)))

        try:
            run_async(main())
        except BaseException as exc:
            errors.append(exc)

    stop = threading.Event()

    def killer():
        rng = random.Random(3)
        kills = 0
        while kills < 6 and not stop.wait(0.1):
            pids = [w.pid for w in pool.stats().workers if w.state == "busy" and w.pid]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=thread_caller, args=(b,)) for b in (0, 10_000, 20_000)]
    threads += [threading.Thread(target=loop_caller, args=(b,)) for b in (100_000, 200_000)]
    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    kill_thread.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a caller hangs"
    assert not errors, errors[:3]
    assert calls["ok"] + calls["crashed"] == 3 * 150 + 2 * 8 * 40
    assert calls["ok"] > 0
    assert pool.execute("echo", "alive") == "alive"
    stats = pool.stats()
    assert stats.in_flight == 0 and stats.queue_depth == 0
    assert stats.restarts > 0  # workers were killed under the callers


def test_a_blocked_event_loop_does_not_hold_the_worker_whose_answer_it_reads(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()

    async def main():
        call = asyncio.ensure_future(pool.async_execute("sleep", 0.2, "a"))
        await asyncio.sleep(0.05)  # it runs; this loop is to read its answer
        futures = [pool.submit_execute("echo", i) for i in range(3)]  # they queue
        t0 = time.monotonic()
        assert [f.result(timeout=WAIT) for f in futures] == [0, 1, 2]  # the loop is blocked
        elapsed = time.monotonic() - t0
        assert await call == "a"
        return elapsed

    assert run_async(main()) < 1.0


def test_a_worker_answers_an_event_loop_a_thread_and_the_dispatcher_in_turn(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()

    async def some(base):
        return [await pool.async_execute("echo", base + i) for i in range(20)]

    for round_ in range(3):
        base = round_ * 1000
        assert run_async(some(base)) == [base + i for i in range(20)]
        assert [pool.execute("echo", base + 100 + i) for i in range(5)] == [
            base + 100 + i for i in range(5)]
        futures = [pool.submit_execute("echo", base + 200 + i) for i in range(5)]
        assert [f.result(timeout=WAIT) for f in futures] == [base + 200 + i for i in range(5)]

    async def mixed():
        # The loop awaits while another thread's calls take the same worker in between.
        loop = asyncio.get_running_loop()
        other = loop.run_in_executor(None, lambda: [pool.execute("echo", -i) for i in range(30)])
        mine = [await pool.async_execute("echo", i) for i in range(30)]
        return mine, await other

    mine, other = run_async(mixed())
    assert mine == list(range(30)) and other == [-i for i in range(30)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_event_loops_that_come_and_go_leave_no_fd_behind(make_pool):
    import gc

    pool = make_pool(Tasks)
    pool.spawn()
    pool.spawn()

    async def calls():
        return [await pool.async_execute("echo", i) for i in range(10)]

    run_async(calls())  # warm: whatever the first loop opens once
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert run_async(calls()) == list(range(10))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2


class Counter(SWorker):
    """Echoes, or streams ``n`` numbers: one class for every kind of call."""

    def spawn(self):
        return os.getpid()

    def execute(self, n, stream=False):
        if stream:
            return (i for i in range(n))
        return n


def test_a_worker_left_idle_after_direct_reads_serves_every_other_path(make_pool):
    """After a thread's calls read their answers themselves, the worker's next task may come
    from anywhere: a queued submit, a stream, a coroutine, a thread again; and a worker that
    dies while it idles there is noticed and replaced."""
    pool = make_pool(Counter, max_restarts=5)
    pid = pool.spawn()
    for round_ in range(3):
        assert [pool.execute(i) for i in range(10)] == list(range(10))
        assert pool.submit_execute(round_).result(timeout=WAIT) == round_
        assert list(pool.stream(3, stream=True)) == [0, 1, 2]
        assert pool.execute(7) == 7
        assert run_async(pool.async_execute(8)) == 8
        assert pool.execute(9) == 9
    os.kill(pid, signal.SIGKILL)  # while it idles, after an answer its caller read
    assert wait_until(lambda: pool.stats().restarts == 1
                      and pool.stats().workers[0].state == "idle", timeout=WAIT)
    assert [pool.execute(i) for i in range(5)] == list(range(5))
    assert pool.submit_execute(11).result(timeout=WAIT) == 11
    assert pool.stats().workers[0].pid != pid
