"""Invariants that hold for any sequence of calls on one pool: every caller gets exactly the
outcome its task deserves, nothing is left queued or in flight, and the counters add up."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import CancelledError

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import wait_until
from workers import Tasks

from stateful_pool import SPool, WorkerCrashedError

OPS = st.sampled_from(["echo", "raise", "sleep", "cancel", "crash", "async_echo"])


@pytest.fixture
def shared_pool():
    """One pool for every example of the test (respawned workers are stopped before the
    no-leaked-children check runs)."""
    # Short window: crashes from earlier examples must not grow the backoff of later ones.
    pool = SPool(Tasks, queue_size=8, restart_backoff=0.01, restart_window=0.5,
                 max_restarts=None)
    try:
        pool.spawn()
        pool.spawn()
        yield pool
    finally:
        pool.shutdown(cancel_futures=True, timeout=10)


@settings(max_examples=int(os.environ.get("SPOOL_EXAMPLES", "15")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=30))
def test_every_call_gets_its_own_outcome(shared_pool, ops):
    pool = shared_pool
    before = pool.stats()
    futures = []
    async_calls = []

    async def run_async(values):
        return await asyncio.wait_for(
            asyncio.gather(*(pool.async_execute("echo", v) for v in values)), timeout=30)

    for i, op in enumerate(ops):
        if op == "echo":
            futures.append((op, i, pool.submit_execute("echo", i)))
        elif op == "raise":
            futures.append((op, i, pool.submit_execute("raise", f"bad {i}")))
        elif op == "sleep":
            futures.append((op, i, pool.submit_execute("sleep", 0.01, i)))
        elif op == "cancel":
            f = pool.submit_execute("sleep", 0.01, i)
            f.cancel()
            futures.append((op, i, f))
        elif op == "crash":
            futures.append((op, i, pool.submit_execute("exit", 3)))
        else:
            async_calls.append(i)
    if async_calls:
        assert asyncio.run(run_async(async_calls)) == async_calls
    for op, i, f in futures:
        try:
            value = f.result(timeout=30)
        except CancelledError:
            assert op == "cancel"
            continue
        except ValueError as exc:
            assert op == "raise" and str(exc) == f"bad {i}"
            continue
        except WorkerCrashedError as exc:
            assert op == "crash" and exc.exitcode == 3
            continue
        assert op in ("echo", "sleep", "cancel") and value == i
    after = pool.stats()
    assert after.queue_depth == 0 and after.in_flight == 0
    assert after.live_workers == 2
    assert pool._capacity.used == 0

    def settled() -> bool:
        """A cancel is counted when the dispatcher thread takes the news, a moment later."""
        s = pool.stats()
        done = s.completed + s.failed + s.cancelled + s.timed_out
        was = before.completed + before.failed + before.cancelled + before.timed_out
        return s.submitted - before.submitted == done - was

    def counters(s):
        return (s.submitted, s.completed, s.failed, s.cancelled, s.timed_out, s.queue_depth,
                s.in_flight, [w.state for w in s.workers], [w.running for w in s.workers])

    assert wait_until(settled, timeout=2), (ops, counters(before), counters(pool.stats()))
