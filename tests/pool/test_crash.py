"""A worker dies: only its own tasks fail, it is respawned, nothing hangs, nothing is retried."""

from __future__ import annotations

import os
import signal
import time

import pytest
from procs import pid_alive, wait_until
from workers import Tasks

from stateful_pool import NoWorkersError, WorkerCrashedError


def two_workers(make_pool, **kwargs):
    pool = make_pool(Tasks, **kwargs)
    pool.spawn()
    pool.spawn()
    return pool


def test_task_exception_comes_back_with_its_type_and_worker_traceback(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    pool.execute("echo", 1)
    with pytest.raises(ValueError, match="boom") as info:
        pool.execute("raise", "boom")
    cause = info.value.__cause__
    assert cause is not None and "do_raise" in str(cause) and "workers.py" in str(cause)
    # The worker and its state live on.
    assert pool.execute("count") == 3
    assert pool.stats().restarts == 0


def test_each_caller_gets_its_own_exception_instance(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    futures = [pool.submit_execute("raise", "same") for _ in range(3)]
    errors = [f.exception(timeout=5) for f in futures]
    assert len({id(e) for e in errors}) == 3


@pytest.mark.parametrize(
    ("action", "expected"),
    [("exit", "exit code 7"), ("sigkill", "signal SIGKILL"), ("segfault", "signal SIGSEGV")],
)
def test_death_mid_task_fails_only_that_task(make_pool, tmp_path, action, expected):
    pool = two_workers(make_pool)
    victim = pool.submit_execute(action, *([7] if action == "exit" else []))
    with pytest.raises(WorkerCrashedError) as info:
        victim.result(timeout=5)
    err = info.value
    assert expected in str(err)
    assert f"pid {err.pid}" in str(err) and f"worker {err.worker_id}" in str(err)
    if action == "exit":
        assert err.exitcode == 7
    else:
        assert err.exitcode == -getattr(signal, expected.split()[-1])
    # The other worker keeps serving meanwhile, and the pool recovers fully.
    assert [pool.execute("echo", i) for i in range(5)] == list(range(5))
    assert wait_until(lambda: pool.stats().live_workers == 2 and
                      all(w.state == "idle" for w in pool.stats().workers), timeout=5)
    stats = pool.stats()
    assert stats.restarts == 1
    assert stats.failed == 1


def test_crash_fails_only_the_tasks_the_dead_worker_held(make_pool, tmp_path):
    pool = make_pool(Tasks, max_restarts=5)
    pool.spawn(marker_dir=str(tmp_path))
    pool.spawn(marker_dir=str(tmp_path))
    slow = [pool.submit_execute("sleep", 0.3, i) for i in range(2)]
    time.sleep(0.1)  # both workers busy; the crash task waits in the queue
    crash = pool.submit_execute("mark_then_exit", "crashed-once")
    queued = [pool.submit_execute("echo", i) for i in range(10)]
    assert [f.result(timeout=5) for f in slow] == [0, 1]
    assert [f.result(timeout=5) for f in queued] == list(range(10))
    with pytest.raises(WorkerCrashedError):
        crash.result(timeout=5)
    # Never retried silently: the crashing task ran exactly once.
    assert wait_until(lambda: pool.stats().restarts == 1, timeout=5)
    assert (tmp_path / "crashed-once").read_text().count("\n") == 1


def test_respawn_uses_the_original_spawn_arguments(make_pool):
    pool = make_pool(Tasks)
    first_pid = pool.spawn(tag="original")
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 1)
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=5)
    new_pid = pool.execute("pid")
    assert new_pid != first_pid
    assert pool.stats().workers[0].pid == new_pid
    assert pool.stats().workers[0].last_exitcode == 1


def test_idle_worker_death_is_noticed_without_a_task(make_pool):
    pool = two_workers(make_pool)
    pid = pool.stats().workers[0].pid
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: pool.stats().restarts == 1 and
                      pool.stats().workers[0].pid != pid and
                      pool.stats().workers[0].state == "idle", timeout=5)
    assert not pid_alive(pid)
    assert pool.stats().failed == 0
    assert [pool.execute("echo", i) for i in range(4)] == list(range(4))


def test_restart_budget_then_no_workers(make_pool):
    pool = make_pool(Tasks, max_restarts=1, restart_backoff=0.01)
    pool.spawn()
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 1)
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=5)
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 1)
    assert wait_until(lambda: pool.stats().workers[0].state == "dead", timeout=5)
    with pytest.raises(NoWorkersError):
        pool.execute("echo", 1)


def test_spent_budget_backs_off_then_the_worker_comes_back(make_pool):
    """A crash burst spends the budget; with crash_loop_backoff the slot is not given up: it
    shows why and when it comes back, work queued meanwhile waits, and it serves again."""
    pool = make_pool(Tasks, max_restarts=1, restart_backoff=0.01, crash_loop_backoff=1.0)
    pool.spawn()
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 1)
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=5)
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 3)
    crashed_at = time.monotonic()
    # The caller hears of the crash before the dispatcher has scheduled the back-off.
    assert wait_until(lambda: pool.stats().workers[0].state == "backing_off", timeout=5)
    worker = pool.stats().workers[0]
    assert 0 < worker.restart_in <= 1.0
    assert worker.last_failure == "died with exit code 3"
    assert pool.stats().live_workers == 1 and pool.stats().serving_workers == 0
    waiting = pool.submit_execute("echo", "after the back-off")
    assert waiting.result(timeout=10) == "after the back-off"
    assert time.monotonic() - crashed_at >= 0.9
    worker = pool.stats().workers[0]
    assert worker.state == "idle" and worker.restart_in is None and worker.restarts == 2


def test_restarts_can_be_turned_off(make_pool):
    pool = make_pool(Tasks, max_restarts=0)
    pool.spawn()
    queued_behind = None
    crash = pool.submit_execute("exit", 2)
    queued_behind = pool.submit_execute("echo", "never runs")
    with pytest.raises(WorkerCrashedError):
        crash.result(timeout=5)
    # The last worker is gone for good: what waited fails at once instead of hanging.
    with pytest.raises(NoWorkersError):
        queued_behind.result(timeout=5)
    assert pool.stats().workers[0].state == "dead"


def test_restart_backoff_delays_the_respawn(make_pool):
    pool = make_pool(Tasks, restart_backoff=0.5)
    pool.spawn()
    with pytest.raises(WorkerCrashedError):
        pool.execute("exit", 1)
    crashed_at = time.monotonic()
    assert pool.stats().workers[0].state == "restarting"
    # Work submitted meanwhile waits for the respawn instead of failing.
    assert pool.execute("echo", "after") == "after"
    assert time.monotonic() - crashed_at >= 0.45


def test_hang_timeout_kills_and_respawns_the_worker(make_pool):
    pool = make_pool(Tasks, hang_timeout=0.5)
    pool.spawn()
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="hang_timeout|more than 0.5 s") as info:
        pool.execute("sleep", 30)
    assert time.monotonic() - t0 < 3
    assert info.value.reason == "hang_timeout"
    assert pool.execute("echo", "alive") == "alive"
    assert pool.stats().restarts == 1


def test_crash_with_a_large_argument_in_flight(make_pool):
    pool = two_workers(make_pool)
    big = b"x" * (4 << 20)
    crashes = [pool.submit_execute("exit", 5, big) for _ in range(3)]
    fine = [pool.submit_execute("echo", big[:100_000]) for _ in range(3)]
    for f in crashes:
        with pytest.raises(WorkerCrashedError):
            f.result(timeout=10)
    assert all(f.result(timeout=10) == big[:100_000] for f in fine)


def test_prefetched_tasks_are_held_by_their_worker_and_fail_with_it(make_pool):
    pool = make_pool(Tasks, prefetch=1, restart_backoff=0.01)
    pool.spawn()
    crash = pool.submit_execute("sleep_then_exit", 0.3)
    behind = pool.submit_execute("echo", "sent ahead")  # prefetched onto the same worker
    time.sleep(0.1)
    assert pool.stats().workers[0].running == 2
    assert not behind.cancel()  # sent ahead: it counts as running
    for f in (crash, behind):
        with pytest.raises(WorkerCrashedError):
            f.result(timeout=5)
    assert pool.execute("echo", "after") == "after"
