"""More pure pieces of the dispatcher, tested without a worker process: the deadline heap,
the poller and its wakeup pipe, the options check and the counters."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stateful_pool._config import PoolConfig
from stateful_pool._deadlines import Deadlines
from stateful_pool._poll import Poller
from stateful_pool._stats import Counters


@dataclass(eq=False)
class Item:
    id: int
    deadline: float | None
    finished: bool = field(default=False)

    def done(self) -> bool:
        return self.finished


# One step: ("push", deadline) | ("finish", index of a pushed item) | ("due", now).
steps = st.lists(st.one_of(
    st.tuples(st.just("push"), st.floats(min_value=0, max_value=100, allow_nan=False)),
    st.tuples(st.just("finish"), st.integers(min_value=0, max_value=200)),
    st.tuples(st.just("due"), st.floats(min_value=0, max_value=100, allow_nan=False)),
    st.tuples(st.just("prune"), st.just(0.0)),
), max_size=120)


@given(steps)
def test_deadlines_yield_each_unfinished_item_once_when_due_soonest_first(plan):
    heap: Deadlines[Item] = Deadlines(prune_at=4)
    pushed: list[Item] = []
    expired: set[int] = set()
    for op, value in plan:
        if op == "push":
            item = Item(len(pushed), value)
            pushed.append(item)
            heap.push(item)
        elif op == "finish" and pushed:
            pushed[int(value) % len(pushed)].finished = True
        elif op == "prune":
            heap.prune(sum(not i.finished and i.id not in expired for i in pushed))
        elif op == "due":
            got = list(heap.due(value))
            assert [i.deadline for i in got] == sorted(i.deadline for i in got)
            for item in got:
                assert item.deadline is not None and item.deadline <= value
                assert not item.finished and item.id not in expired
                expired.add(item.id)
    # Whatever was pruned, every unfinished item still comes up exactly once in the end.
    rest = {i.id for i in heap.due(float("inf"))}
    assert rest == {i.id for i in pushed if not i.finished} - expired


def test_deadlines_prune_drops_finished_items_once_they_are_the_majority():
    heap: Deadlines[Item] = Deadlines(prune_at=10)
    items = [Item(n, 1000.0 + n) for n in range(30)]
    for item in items:
        heap.push(item)
    for item in items[:25]:
        item.finished = True
    heap.prune(unfinished=20)  # 30 entries, not over twice 20: kept as they are
    assert len(heap) == 30
    heap.prune(unfinished=5)
    assert len(heap) == 5
    assert heap.next_at() == 1025.0
    assert [i.id for i in heap.due(2000.0)] == [25, 26, 27, 28, 29]
    assert heap.next_at() is None


def test_poller_returns_ready_fds_and_is_woken_from_another_thread():
    poller: Poller[str] = Poller()
    r, w = os.pipe()
    try:
        poller.watch(r, "pipe")
        assert poller.poll(0.0) == []
        os.write(w, b"x")
        ready = poller.poll(1.0)
        assert ready == [r] and poller.owner(r) == "pipe"
        os.read(r, 1)
        threading.Timer(0.05, poller.wake).start()
        started = time.monotonic()
        assert poller.poll(5.0) == []  # woken, nothing ready
        assert time.monotonic() - started < 2.0
        for _ in range(1000):
            poller.wake()  # repeated wakeups cost one byte, and never block
        assert poller.poll(0.0) == []
        assert poller.poll(0.0) == []  # the pipe was drained
        poller.unwatch(r)
        assert poller.owner(r) is None
        os.write(w, b"x")
        assert poller.poll(0.0) == []  # no longer watched
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("options", "message"), [
    ({"restart_window": 0}, "restart_window must be > 0 seconds, got 0"),
    ({"restart_backoff": -1}, "restart_backoff must be >= 0 seconds, got -1"),
    ({"abort_grace": -0.5}, "abort_grace must be >= 0 seconds, got -0.5"),
    ({"prefetch": -1}, "prefetch must be >= 0, got -1"),
    ({"submission_timeout": -1}, "submission_timeout must be None or >= 0, got -1"),
    ({"spawn_timeout": 0}, "spawn_timeout must be None or > 0 seconds, got 0"),
])
def test_config_names_the_option_out_of_range(options, message):
    with pytest.raises(ValueError, match=message):
        PoolConfig(**options)


def test_config_defaults_are_valid_and_frozen():
    config = PoolConfig()
    assert (config.max_restarts, config.restart_window, config.abort_grace) == (5, 60.0, 1.0)
    with pytest.raises(AttributeError):
        config.prefetch = 3  # type: ignore[misc]


def test_counters_snapshot_adds_running_tasks_to_in_flight():
    counters = Counters()
    counters.submitted, counters.completed = 7, 4
    counters.batches.record(3)
    counters.batches.record(1)
    counters.queue_wait.record(0.002)
    stats = counters.snapshot(workers=(), queued=2)
    assert (stats.submitted, stats.completed, stats.queue_depth, stats.in_flight) == (7, 4, 2, 2)
    assert (stats.batches, stats.batch_size_max, stats.batch_size_mean) == (2, 3, 2.0)
    assert stats.batch_size_hist == {3: 1, 1: 1}
    assert stats.queue_wait.count == 1
