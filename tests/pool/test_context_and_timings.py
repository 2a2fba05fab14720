"""Per-call context that reaches the worker (request ids, trace context), and the queue-wait
and run-time histograms that tell a slow model from a long queue."""

from __future__ import annotations

import asyncio
import threading

import pytest
from workers import Contextual, Tasks

from stateful_pool import current_contexts


def test_context_reaches_the_worker_with_its_task(make_pool):
    pool = make_pool(Contextual)
    pool.spawn()
    assert pool.with_context({"request_id": "r1"}).execute(5) == (5, [{"request_id": "r1"}])
    assert pool.execute(6) == (6, [])  # no context, nothing left over from the last task
    timed = pool.with_timeout(5).with_context({"trace": "00-abc-01"})

    async def main():
        return await timed.async_execute(7)

    assert asyncio.run(main()) == (7, [{"trace": "00-abc-01"}])
    assert current_contexts() == []  # outside a worker


def test_each_batch_item_gets_its_own_context(make_pool):
    pool = make_pool(Contextual, max_batch_size=8, max_batch_wait=0.2)
    pool.spawn()
    futures = [pool.with_context({"i": i}).submit_execute(i) if i % 2 else
               pool.submit_execute(i) for i in range(6)]
    results = [f.result(timeout=10) for f in futures]
    assert [r[:2] for r in results] == [(i, {"i": i} if i % 2 else {}) for i in range(6)]
    assert {r[2] for r in results} == {6}  # one batch of six, one context per item


def test_a_context_that_cannot_pickle_is_refused_in_the_caller(make_pool):
    pool = make_pool(Contextual)
    with pytest.raises(TypeError, match="task context must pickle"):
        pool.with_context({"lock": threading.Lock()})


def test_queue_wait_and_run_time_tell_a_slow_model_from_a_long_queue(make_pool):
    pool = make_pool(Tasks)
    pool.spawn()
    futures = [pool.submit_execute("sleep", 0.1) for _ in range(4)]
    for f in futures:
        f.result(timeout=10)
    stats = pool.stats()
    assert stats.run_time.count == 4 and stats.queue_wait.count == 4
    assert 0.4 <= stats.run_time.sum < 1.0  # four runs of 0.1 s
    # They waited 0 + 0.1 + 0.2 + 0.3 s for the one worker.
    assert 0.55 <= stats.queue_wait.sum < 1.2
    assert sum(stats.run_time.counts) == 4
    bucket = stats.run_time.bounds.index(0.25)  # 0.1 s lands in (0.1, 0.25]
    assert stats.run_time.counts[bucket] == 4
    worker = stats.workers[0]
    assert worker.run_time.count == 4 and worker.run_time.sum == pytest.approx(
        stats.run_time.sum)
    pool.execute("echo", 1)
    assert stats.run_time.count == 4  # a snapshot: later tasks do not change it
    assert pool.stats().run_time.count == 5
