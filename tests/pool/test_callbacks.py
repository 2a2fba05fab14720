"""What users do in a future's done-callback. The callbacks of a task's future run on the
pool's dispatcher thread, the thread that hands out tasks and makes room in the queue: a call
that would wait there for the pool must fail at once with a clear error instead of freezing
the whole pool (and its shutdown, and interpreter exit)."""

from __future__ import annotations

import threading

import pytest
from procs import wait_until
from workers import Tasks

from stateful_pool import QueueFullError, WorkerCrashedError


def test_a_callback_that_submits_into_a_full_queue_gets_queue_full_at_once(make_pool):
    """Chaining the next step from a callback, while other callers wait for room."""
    pool = make_pool(Tasks, queue_size=2)
    pool.spawn()
    outcomes: list[object] = []

    def submit_next_step(f):
        try:
            outcomes.append(pool.submit_execute("echo", f.result() + 100))
        except QueueFullError as exc:
            outcomes.append(exc)

    first = [pool.submit_execute("sleep", 0.3, 0)]  # runs; the next two fill the queue
    first += [pool.submit_execute("sleep", 0.02, i) for i in (1, 2)]
    for f in first:
        f.add_done_callback(submit_next_step)
    # Threads wait for room meanwhile: every place that frees goes to them first.
    waiting = [threading.Thread(target=pool.execute, args=("sleep", 0.02)) for _ in range(3)]
    for t in waiting:
        t.start()
    assert [f.result(timeout=10) for f in first] == [0, 1, 2]
    for t in waiting:
        t.join(timeout=10)
    assert len(outcomes) == 3
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    assert refused, "no callback found the queue full; the test proved nothing"
    assert all("dispatcher thread" in str(exc) for exc in refused), refused
    assert all(o.result(timeout=10) >= 100 for o in outcomes if o not in refused)
    assert pool.execute("echo", "still serving") == "still serving"


def test_waiting_for_the_pool_inside_a_callback_raises_instead_of_deadlocking(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    errors: list[BaseException] = []
    done = threading.Event()

    def wait_inside(_f):
        for call in (lambda: pool.execute("echo", 1),
                     lambda: pool.with_timeout(5).execute("echo", 2),
                     lambda: pool.submit_execute("echo", 3).result(),
                     lambda: pool.spawn(),
                     lambda: pool.submit_spawn().exception()):
            try:
                call()
            except RuntimeError as exc:
                errors.append(exc)
        done.set()

    pool.submit_execute("echo", 0).add_done_callback(wait_inside)
    assert done.wait(timeout=10), "the callback is stuck: the pool deadlocked"
    assert len(errors) == 5 and all("done-callback" in str(e) for e in errors), errors
    assert pool.execute("echo", "still serving") == "still serving"
    # Only what was submitted without waiting ran: the one task, the one extra worker.
    assert wait_until(lambda: pool.stats().live_workers == 2 and pool.stats().in_flight == 0)
    stats = pool.stats()
    assert stats.submitted == 3 and len(stats.workers) == 2


def test_cancelling_the_siblings_when_the_last_worker_dies_counts_them_cancelled(make_pool):
    """Fail fast: the first failure cancels the tasks still queued. Here the failure is the
    death of the pool's last worker (no restarts left), which also fails the queue."""
    pool = make_pool(Tasks, max_restarts=0)
    pool.spawn()
    doomed = pool.submit_execute("sleep_then_exit", 0.2)
    queued = [pool.submit_execute("echo", i) for i in range(3)]
    doomed.add_done_callback(lambda _f: [f.cancel() for f in queued])
    with pytest.raises(WorkerCrashedError):
        doomed.result(timeout=10)
    # result() returns before the done-callbacks run (concurrent.futures wakes waiters first).
    assert wait_until(lambda: all(f.cancelled() for f in queued), timeout=2)

    def counted():
        s = pool.stats()
        return (s.submitted, s.failed, s.cancelled) == (4, 1, 3)

    assert wait_until(counted, timeout=2), pool.stats()
