"""A pool driven through random sequences of what users do (spawn, submit, cancel, time out,
crash a worker, kill one from outside, call from asyncio, shut down), with its invariants
checked after every step: the stats never contradict themselves, and at the end every future
has exactly the outcome its task deserves, the counters add up, and no process is left.

The pool's options are drawn too (queue bound, prefetch, restart budget, execution timeout).
A few seconds by default; for a deeper search, ``SPOOL_MACHINE_EXAMPLES=300
SPOOL_MACHINE_STEPS=30`` (about 90 s here; that is how the miscounted cancels were found)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import CancelledError

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from procs import pid_alive, wait_until
from workers import Tasks

from stateful_pool import (
    NoWorkersError,
    PoolClosedError,
    QueueFullError,
    SPool,
    TaskTimeoutError,
    WorkerCrashedError,
)

# What may happen to a task of each kind, besides what may happen to any task: its worker
# crashes, the pool shuts down (cancelling it, or failing it at the deadline), or the last
# worker is lost.
ANY = {WorkerCrashedError, CancelledError, PoolClosedError, NoWorkersError}
ALLOWED = {
    "echo": {"ok"} | ANY,
    "raise": {ValueError} | ANY,
    "crash": ANY,
    "timeout": {"ok", TaskTimeoutError} | ANY,
    "cancel": {"ok"} | ANY,
}
WAIT = 20.0  # bound on any single wait


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: SPool | None = None
        self.pids: set[int] = set()
        self.futures: list[tuple[str, object, object]] = []  # (kind, expected value, future)
        self.resolved: dict[int, int] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.spawned = 0
        self.n = 0
        self.may_time_out = False

    def _track(self, kind, value, future) -> None:
        key = id(future)

        def done(_f):
            with self.lock:
                self.resolved[key] = self.resolved.get(key, 0) + 1

        future.add_done_callback(done)
        self.futures.append((kind, value, future))

    def _submit(self, kind, *args, timeout=None):
        self.n += 1
        target = self.pool if timeout is None else self.pool.with_timeout(timeout)
        try:
            return target.submit_execute(*args)
        except (QueueFullError, TaskTimeoutError):
            return None  # refused at the door: nothing was queued
        except NoWorkersError:
            assert self.pool.stats().live_workers == 0
            return None
        except PoolClosedError:
            assert self.closed
            return None

    # ---- rules ------------------------------------------------------------------------------

    @initialize(workers=st.integers(1, 2), queue_size=st.sampled_from([None, 4]),
                prefetch=st.sampled_from([0, 1]), max_restarts=st.sampled_from([None, 1]),
                execution_timeout=st.sampled_from([None, 0.3]))
    def start(self, workers, queue_size, prefetch, max_restarts, execution_timeout) -> None:
        # Short restart window: backoff must not grow across the crashes of one run.
        self.pool = SPool(Tasks, queue_size=queue_size, submission_timeout=0.5,
                          prefetch=prefetch, max_restarts=max_restarts,
                          execution_timeout=execution_timeout, restart_backoff=0.01,
                          restart_window=0.5)
        self.may_time_out = execution_timeout is not None
        self.spawned = workers
        futures = [self.pool.submit_spawn() for _ in range(workers)]
        self.pids.update(f.result(timeout=WAIT) for f in futures)

    @precondition(lambda self: self.spawned < 3)  # the model's count: deterministic
    @rule()
    def spawn(self) -> None:
        self.spawned += 1
        try:
            self.pids.add(self.pool.spawn())
        except PoolClosedError:
            assert self.closed

    @rule(kind=st.sampled_from(["echo", "raise", "crash", "timeout", "cancel"]),
          seconds=st.sampled_from([0.0, 0.02]))
    def submit(self, kind, seconds) -> None:
        n = self.n
        if kind == "echo":
            f = self._submit(kind, "sleep", seconds, n)
        elif kind == "raise":
            f = self._submit(kind, "raise", f"bad {n}")
        elif kind == "crash":
            f = self._submit(kind, "sleep_then_exit", seconds)
        elif kind == "timeout":
            f = self._submit(kind, "sleep", 0.05, n, timeout=0.01 + seconds)
        else:
            f = self._submit(kind, "sleep", seconds, n)
            if f is not None:
                f.cancel()
        if f is not None:
            self._track(kind, n, f)

    @rule(count=st.integers(1, 6), cancel_first=st.booleans())
    def from_asyncio(self, count, cancel_first) -> None:
        pool = self.pool
        refused = (QueueFullError, NoWorkersError, WorkerCrashedError, PoolClosedError,
                   TaskTimeoutError)

        async def call(i):
            try:
                return await pool.async_execute("sleep", 0.01, i)
            except refused as e:
                return type(e)

        async def main():
            tasks = [asyncio.ensure_future(call(i)) for i in range(count)]
            if cancel_first:
                await asyncio.sleep(0.005)
                tasks[0].cancel()
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)

        for i, r in enumerate(asyncio.run(main())):
            if isinstance(r, asyncio.CancelledError):
                assert i == 0 and cancel_first
            elif r is TaskTimeoutError:
                assert self.may_time_out
            else:
                assert r == i or r in refused, r

    @rule()
    def kill_a_busy_worker(self) -> None:
        busy = [w.pid for w in self.pool.stats().workers if w.state == "busy" and w.pid]
        if busy:
            try:
                os.kill(busy[0], signal.SIGKILL)
            except ProcessLookupError:
                pass

    @rule()
    def wait_for_everything(self) -> None:
        for _, _, f in self.futures:
            try:
                f.exception(timeout=WAIT)
            except CancelledError:
                pass

    @rule(cancel_futures=st.booleans(), timeout=st.sampled_from([None, 0.05]),
          wait=st.booleans())
    def shutdown(self, cancel_futures, timeout, wait) -> None:
        self.closed = True
        t0 = time.monotonic()
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures, timeout=timeout)
        assert time.monotonic() - t0 < WAIT

    # ---- invariants -------------------------------------------------------------------------

    @precondition(lambda self: self.pool is not None)
    @invariant()
    def stats_are_consistent(self) -> None:
        s = self.pool.stats()
        self.pids.update(w.pid for w in s.workers if w.pid)  # respawned ones too
        assert 0 <= s.queue_depth <= s.in_flight
        assert s.completed + s.failed + s.cancelled + s.timed_out <= s.submitted
        assert 0 <= self.pool._capacity.used <= 4
        with self.lock:
            assert all(count == 1 for count in self.resolved.values()), self.resolved

    def teardown(self) -> None:
        if self.pool is None:
            return
        try:
            self.wait_for_everything()
            for kind, value, f in self.futures:
                assert f.done()
                if f.cancelled():
                    outcome: object = CancelledError
                elif f.exception() is None:
                    outcome = "ok"
                    assert f.result() == value
                else:
                    outcome = type(f.exception())
                allowed = ALLOWED[kind] | ({TaskTimeoutError} if self.may_time_out else set())
                assert outcome in allowed, (kind, outcome)
            if not self.closed:
                def settled():
                    s = self.pool.stats()
                    return (s.in_flight == 0 and s.submitted
                            == s.completed + s.failed + s.cancelled + s.timed_out)
                assert wait_until(settled, timeout=5), self.pool.stats()
                assert self.pool._capacity.used == 0
        finally:
            self.pool.shutdown(cancel_futures=True, timeout=5)
        s = self.pool.stats()
        assert s.submitted == s.completed + s.failed + s.cancelled + s.timed_out, s
        assert s.in_flight == 0
        assert all(w.state in ("stopped", "dead") for w in s.workers), s.workers
        assert wait_until(lambda: not any(pid_alive(p) for p in self.pids), timeout=5)
        with self.lock:
            assert len(self.resolved) == len(self.futures)


PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SPOOL_MACHINE_EXAMPLES", "15")),
    stateful_step_count=int(os.environ.get("SPOOL_MACHINE_STEPS", "15")), deadline=None)
test_pool_state_machine = PoolMachine.TestCase
