"""Leaving a pool because something went wrong, as users do it: Ctrl-C (a real SIGINT to a
real interpreter) with long tasks running, an error inside ``with``, a caller that gave up,
and a second Ctrl-C during a shutdown that waits. The program must end in seconds and leave
no worker behind."""

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

from stateful_pool import SPool, SWorker, TaskTimeoutError

TESTS = Path(__file__).resolve().parents[1] / "support"
ROOT = TESTS.parents[1]


class Interrupted:
    """A child interpreter that prints its worker pids, then runs until interrupted."""

    def __init__(self, body: str) -> None:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
        # As in a terminal: Ctrl-C raises KeyboardInterrupt. (A test run started in the
        # background of a non-interactive shell inherits SIGINT ignored, and so would this
        # child.)
        body = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                + textwrap.dedent(body))
        self.proc = subprocess.Popen([sys.executable, "-c", body], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Interrupted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()  # type: ignore[union-attr]

    def worker_pids(self) -> list[int]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        pids = [int(p) for p in line.split()]
        assert pids, self.proc.stderr.read()  # type: ignore[union-attr]
        return pids

    def interrupt_and_time(self, times: int = 1, gap: float = 0.3) -> tuple[float, str]:
        """Send SIGINT ``times`` times; return seconds from the first to the exit, and stderr."""
        t0 = time.monotonic()
        for i in range(times):
            if i:
                time.sleep(gap)
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        return time.monotonic() - t0, self.proc.stderr.read()  # type: ignore[union-attr]


def assert_interrupt_ends_it(child: Interrupted, limit: float, times: int = 1,
                             gap: float = 0.3) -> None:
    """Once the long tasks run, Ctrl-C (``times`` times) ends the program within ``limit``
    seconds with a KeyboardInterrupt, and no worker outlives it."""
    pids = child.worker_pids()
    time.sleep(0.3)  # the long tasks have reached the workers
    assert all(pid_alive(p) for p in pids)
    elapsed, stderr = child.interrupt_and_time(times, gap)
    assert child.proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert elapsed < limit, f"took {elapsed:.1f} s to end after Ctrl-C"
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=2)


def test_ctrl_c_inside_with_ends_the_program_quickly():
    with Interrupted("""
        from stateful_pool import SPool
        from workers import Tasks
        with SPool(Tasks) as pool:
            pids = [pool.spawn(), pool.spawn()]
            futures = [pool.submit_execute("sleep", 60) for _ in range(4)]
            print(*pids, flush=True)
            futures[0].result()
    """) as child:
        assert_interrupt_ends_it(child, limit=3)


def test_ctrl_c_inside_async_with_ends_the_program_quickly():
    with Interrupted("""
        import asyncio
        from stateful_pool import SPool
        from workers import Tasks

        async def main():
            async with SPool(Tasks) as pool:
                pids = [await pool.async_spawn(), await pool.async_spawn()]
                calls = [asyncio.ensure_future(pool.async_execute("sleep", 60))
                         for _ in range(4)]
                print(*pids, flush=True)
                await asyncio.gather(*calls)

        asyncio.run(main())
    """) as child:
        assert_interrupt_ends_it(child, limit=3)


def test_second_ctrl_c_stops_a_shutdown_that_waits_for_running_tasks():
    """Leaving ``with`` normally waits for accepted work; a Ctrl-C then stops it at once."""
    with Interrupted("""
        from stateful_pool import SPool
        from workers import Tasks
        with SPool(Tasks) as pool:
            pids = [pool.spawn()]
            pool.submit_execute("sleep", 60)
            print(*pids, flush=True)
        # leaving the block normally: shutdown waits for the 60 s task
    """) as child:
        assert_interrupt_ends_it(child, limit=3)


def test_second_ctrl_c_under_asyncio_run_stops_the_workers_at_once():
    """asyncio.run turns the first Ctrl-C into a cancellation; with a long abort_grace the
    second one must not wait for it."""
    with Interrupted("""
        import asyncio
        from stateful_pool import SPool
        from workers import Tasks

        async def main():
            async with SPool(Tasks, abort_grace=60) as pool:
                pids = [await pool.async_spawn()]
                call = asyncio.ensure_future(pool.async_execute("sleep", 60))
                print(*pids, flush=True)
                await call

        asyncio.run(main())
    """) as child:
        assert_interrupt_ends_it(child, limit=4, times=2, gap=0.5)


def test_an_error_inside_with_propagates_unchanged_after_a_short_grace():
    pool = SPool(Tasks, abort_grace=0.5)
    pids = [pool.spawn(), pool.spawn()]
    futures = []
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="user error") as info:
        with pool:
            futures = [pool.submit_execute("sleep", 30) for _ in range(2)]
            queued = pool.submit_execute("echo", "never")
            quick = pool.submit_execute("sleep", 0.01, "quick")  # noqa: F841 (queued too)
            time.sleep(0.3)
            raise ValueError("user error")
    assert type(info.value) is ValueError
    assert time.monotonic() - t0 < 3
    assert queued.cancelled()
    assert all(isinstance(f.exception(timeout=0), Exception) for f in futures)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=2)


def test_shutdown_does_not_wait_for_a_task_whose_caller_timed_out():
    pool = SPool(Tasks, execution_timeout=0.5)
    pids = [pool.spawn()]
    t0 = time.monotonic()
    with pool:
        with pytest.raises(TaskTimeoutError):
            pool.execute("sleep", 30)
        assert 0.4 < time.monotonic() - t0 < 2
    assert time.monotonic() - t0 < 3, "shutdown waited for a task nobody waits for"
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=2)


def test_shutdown_does_not_wait_for_a_running_task_whose_asyncio_caller_cancelled():
    async def main():
        async with SPool(Tasks) as pool:
            pid = await pool.async_spawn()
            call = asyncio.ensure_future(pool.async_execute("sleep", 30))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            t0 = time.monotonic()
        return pid, time.monotonic() - t0

    pid, leaving = asyncio.run(main())
    assert leaving < 3, "leaving async with waited for a cancelled task"
    assert wait_until(lambda: not pid_alive(pid), timeout=2)


def test_shutdown_waits_for_the_wanted_task_and_not_for_the_abandoned_one():
    pool = SPool(Tasks, execution_timeout=0.3)
    pool.spawn()
    pool.spawn()
    abandoned = pool.submit_execute("sleep", 30)
    time.sleep(0.5)  # its timeout passed: the caller has its TaskTimeoutError
    assert isinstance(abandoned.exception(timeout=0), TaskTimeoutError)
    slow_pool_caller = pool.submit_execute("started_at", 0.0)  # a wanted task, quick
    t0 = time.monotonic()
    pool.shutdown()
    assert isinstance(slow_pool_caller.result(timeout=0), float)
    assert time.monotonic() - t0 < 3


class Closing(SWorker):
    """Its close() leaves a marker; a slow atexit hook stands for interpreter teardown."""

    def spawn(self, marker):
        import atexit

        self.marker = marker
        atexit.register(time.sleep, 5)  # would delay a normal interpreter exit by 5 s
        return os.getpid()

    def execute(self, x):
        return x

    def close(self):
        with open(self.marker, "a") as f:
            f.write(f"closed {os.getpid()}\n")


def test_idle_workers_run_close_and_stop_in_milliseconds(tmp_path):
    marker = tmp_path / "closed.txt"
    pool = SPool(Closing)
    pids = [pool.spawn(str(marker)) for _ in range(3)]
    assert pool.execute(7) == 7
    t0 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t0 < 1.0, "idle workers paid for interpreter teardown"
    assert sorted(marker.read_text().split("\n")[:-1]) == sorted(f"closed {p}" for p in pids)
    assert not any(pid_alive(p) for p in pids)
