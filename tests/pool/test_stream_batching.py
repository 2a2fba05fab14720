"""Continuous batching of streams: a worker with ``stream_step`` advances every active stream
by one chunk per step; new streams join the running batch at the next step and finished or
cancelled ones leave it without waiting for the others."""

from __future__ import annotations

import asyncio
import time

import pytest
from stream_workers import StepOnly, Stepper

BOUND = 30.0
STEP = 0.05


@pytest.fixture
def pool(make_pool, tmp_path):
    pool = make_pool(Stepper, max_batch_size=4, execution_timeout=BOUND)
    pool.spawn(step_s=STEP, marker_dir=str(tmp_path))
    return pool


def steps_with(log, name):
    return [i for i, names in enumerate(log) if name in names]


def test_a_new_stream_joins_the_running_batch_at_the_next_step(pool):
    long = pool.stream("long", 40)
    assert [next(long) for _ in range(3)] == [("long", 0), ("long", 1), ("long", 2)]
    joined = time.monotonic()
    short = pool.stream("short", 3)
    assert next(short) == ("short", 0)
    assert time.monotonic() - joined < 4 * STEP + 0.5  # not after "long"'s 37 other steps
    assert list(short) == [("short", 1), ("short", 2)]
    assert list(long) == [("long", i) for i in range(3, 40)]
    log = pool.execute("log")
    long_steps, short_steps = steps_with(log, "long"), steps_with(log, "short")
    # "short" ran inside "long"'s batch, in consecutive steps, and left it before "long" ended.
    assert long_steps[0] < short_steps[0] <= long_steps[0] + 6
    assert short_steps == list(range(short_steps[0], short_steps[0] + 4))
    assert short_steps[-1] < long_steps[-1]
    assert all(len(names) <= 4 for names in log)


def test_a_cancelled_stream_leaves_the_batch_and_the_others_go_on(pool, tmp_path):
    a = pool.stream("a", 30)
    b = pool.stream("b", 10)
    assert next(a)[0] == "a" and next(b)[0] == "b"
    a.close()
    assert list(b) == [("b", i) for i in range(1, 10)]
    log = pool.execute("log")
    assert "a" in pool.execute("closed")
    assert int((tmp_path / "a").read_text()) < 10  # left long before its 30 steps
    assert len(steps_with(log, "a")) < 10


def test_one_failing_stream_fails_alone(pool):
    bad = pool.stream("bad", 10, 2)
    good = pool.stream("good", 5)
    got = []
    with pytest.raises(ValueError, match="bad failed at 2"):
        for chunk in bad:
            got.append(chunk)
    assert got == [("bad", 0), ("bad", 1)]
    assert list(good) == [("good", i) for i in range(5)]


def test_execute_on_a_stream_step_worker_gives_the_list(make_pool):
    pool = make_pool(StepOnly, max_batch_size=4, execution_timeout=BOUND)
    pool.spawn(step_s=0.01)
    assert pool.execute("x", 3) == [("x", 0), ("x", 1), ("x", 2)]

    async def main():
        return await asyncio.gather(*(pool.async_execute(f"e{i}", 2) for i in range(6)))

    assert asyncio.run(asyncio.wait_for(main(), BOUND)) == [
        [(f"e{i}", 0), (f"e{i}", 1)] for i in range(6)]


def test_more_streams_than_the_batch_holds_wait_and_join_when_there_is_room(pool):
    async def main():
        async def one(i):
            return [c async for c in pool.async_stream(f"s{i}", 4 + i % 3)]

        return await asyncio.gather(*(one(i) for i in range(10)))

    results = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert results == [[(f"s{i}", j) for j in range(4 + i % 3)] for i in range(10)]
    log = pool.execute("log")
    assert max(len(names) for names in log) == 4
    # Batches refilled as streams left: far fewer steps than one stream at a time.
    assert len(log) < sum(5 + i % 3 for i in range(10)) * 0.6
