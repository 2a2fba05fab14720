"""Shutdown: drains or cancels, is idempotent, leaves nothing behind, even when the parent dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from procs import pid_alive, wait_until
from workers import Tasks

from stateful_pool import PoolClosedError, SPool

TESTS = Path(__file__).resolve().parents[1] / "support"
ROOT = TESTS.parents[1]


def test_shutdown_finishes_accepted_tasks_by_default():
    pool = SPool(Tasks)
    pool.spawn()
    pool.spawn()
    futures = [pool.submit_execute("sleep", 0.05, i) for i in range(10)]
    pool.shutdown()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(10))
    assert {w.state for w in pool.stats().workers} == {"stopped"}


def test_shutdown_is_idempotent_and_closes_submission():
    pool = SPool(Tasks)
    pool.spawn()
    pool.shutdown()
    pool.shutdown()
    with pytest.raises(PoolClosedError):
        pool.submit_execute("echo", 1)
    with pytest.raises(PoolClosedError):
        pool.spawn()

    async def late():
        await pool.async_execute("echo", 1)

    with pytest.raises(PoolClosedError):
        asyncio.run(late())


def test_cancel_futures_drops_what_has_not_started():
    pool = SPool(Tasks)
    pool.spawn()
    running = pool.submit_execute("sleep", 0.3, "ran")
    time.sleep(0.1)
    queued = [pool.submit_execute("echo", i) for i in range(5)]
    pool.shutdown(cancel_futures=True)
    assert running.result(timeout=0) == "ran"
    assert all(f.cancelled() for f in queued)


def test_cancel_futures_tells_threads_blocked_in_execute_on_queued_tasks():
    from concurrent.futures import CancelledError, ThreadPoolExecutor

    pool = SPool(Tasks)
    try:
        pool.spawn()
        running = pool.submit_execute("sleep", 1.0, "ran")
        with ThreadPoolExecutor(4) as threads:
            blocked = [threads.submit(pool.execute, "echo", i) for i in range(4)]
            assert wait_until(lambda: pool.stats().queue_depth == 4, timeout=10)
            pool.shutdown(cancel_futures=True)
            for call in blocked:
                with pytest.raises(CancelledError):
                    call.result(timeout=10)
        assert running.result(timeout=0) == "ran"
    finally:
        pool.shutdown(cancel_futures=True, timeout=5)


def assert_shutdown_ends_in_time(pool, future, why):
    """``shutdown(timeout=0.5)`` returns within 3 s, and the future still in the works then
    fails with ``PoolClosedError`` saying ``why``."""
    t0 = time.monotonic()
    pool.shutdown(timeout=0.5)
    assert time.monotonic() - t0 < 3
    with pytest.raises(PoolClosedError, match=why):
        future.result(timeout=0)


def test_shutdown_timeout_bounds_the_wait_for_running_tasks(caplog):
    pool = SPool(Tasks)
    pool.spawn()
    stuck = pool.submit_execute("sleep", 60)
    time.sleep(0.1)
    queued = [pool.submit_execute("echo", i) for i in range(3)]
    assert_shutdown_ends_in_time(pool, stuck, "shut down before this task finished")
    assert all(f.cancelled() for f in queued)
    s = pool.stats()
    assert (s.submitted, s.failed, s.cancelled) == (4, 1, 3)
    # The worker was killed on purpose at the deadline: nothing to warn about.
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]


def test_shutdown_from_the_event_loop_thread():
    async def main():
        pool = SPool(Tasks)
        await pool.async_spawn()
        pending = [asyncio.ensure_future(pool.async_execute("sleep", 0.05, i)) for i in range(4)]
        await asyncio.sleep(0.01)
        pool.shutdown()  # blocks this thread; must not deadlock on the loop
        return await asyncio.gather(*pending)

    assert asyncio.run(asyncio.wait_for(main(), 20)) == [0, 1, 2, 3]


def test_shutdown_while_a_spawn_is_in_progress():
    pool = SPool(Tasks)
    spawn = pool.submit_spawn()
    pool.shutdown()
    assert isinstance(spawn.result(timeout=0), int)


def test_a_dropped_pool_stops_its_workers_even_with_an_execution_timeout():
    """A notebook cell run twice (``pool = SPool(...)`` again) drops the first pool: its
    workers, and the GPU memory they hold, must go now, not when the deadline of its last
    task (still in the deadline heap) comes up."""
    pool = SPool(Tasks, execution_timeout=600)
    pids = [pool.spawn(), pool.spawn()]
    assert pool.execute("echo", 1) == 1
    done = [pool.submit_execute("echo", i) for i in range(3)]
    assert [f.result(timeout=10) for f in done] == [0, 1, 2]  # futures kept: they are done
    del pool
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)


def _run_script(body: str, timeout: float) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
    code = textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_forgotten_pool_is_shut_down_at_interpreter_exit():
    proc = _run_script("""
        from stateful_pool import SPool
        from workers import Tasks
        pool = SPool(Tasks)
        pids = [pool.spawn(), pool.spawn()]
        futures = [pool.submit_execute("sleep", 0.5, i) for i in range(4)]
        print(*pids, flush=True)
        # no shutdown(): at exit the pool cancels what has not started, lets the running
        # tasks finish (bounded), stops the workers, and the interpreter exits
    """, timeout=30)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert len(pids) == 2
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)


def test_workers_exit_when_the_parent_is_sigkilled():
    proc = _run_script("""
        import time
        from stateful_pool import SPool
        from workers import Tasks
        pool = SPool(Tasks)
        pids = [pool.spawn(), pool.spawn()]
        pool.submit_execute("sleep", 60)  # one busy, one idle
        print(*pids, flush=True)
        time.sleep(60)
    """, timeout=30)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)
        assert time.monotonic() - t0 < 3
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_shutdown_deadline_during_a_slow_spawn_resolves_the_spawn_future():
    from workers import SpawnHangs

    pool = SPool(SpawnHangs)
    spawn = pool.submit_spawn(60)
    time.sleep(0.2)
    assert_shutdown_ends_in_time(pool, spawn, "before this worker finished spawning")


def _group_sigterm(body: str) -> tuple[list[int], str, str]:
    """Run ``body`` in a session of its own (its own process group, as under systemd or a
    process manager); once it prints its worker pids, SIGTERM the whole group. Return the
    pids and the program's stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(body)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2, proc.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.3)  # the tasks have reached the workers
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5)
        return pids, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_a_group_sigterm_leaves_the_drain_to_the_program():
    """SIGTERM to the whole process group: the workers do not die mid-task; a program that
    handles SIGTERM by shutting the pool down gets every running task's result."""
    _, out, err = _group_sigterm("""
        import signal, threading
        from stateful_pool import SPool
        from workers import Tasks
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        pool = SPool(Tasks)
        pids = [pool.spawn(), pool.spawn()]
        futures = [pool.submit_execute("sleep", 1.0, i) for i in range(2)]
        print(*pids, flush=True)
        stop.wait(30)
        pool.shutdown()
        print("results", [f.result(timeout=5) for f in futures], flush=True)
    """)
    assert "results [0, 1]" in out, err


def test_a_group_sigterm_to_a_program_that_does_not_handle_it_still_ends_the_workers():
    """The default SIGTERM ends the program at once; its workers notice and exit too."""
    pids, _, _ = _group_sigterm("""
        import time
        from stateful_pool import SPool
        from workers import Tasks
        pool = SPool(Tasks)
        pids = [pool.spawn(), pool.spawn()]
        pool.submit_execute("sleep", 60)
        print(*pids, flush=True)
        time.sleep(60)
    """)
    assert not any(pid_alive(p) for p in pids)
