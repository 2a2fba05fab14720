"""Spawning: errors in spawn come back, deaths and hangs during spawn never hang the caller."""

from __future__ import annotations

import threading
import time

import pytest
from workers import Echo, SpawnDies, SpawnHangs, SpawnRaises

from stateful_pool import NoWorkersError, SpawnError, SpawnTimeoutError


def test_spawn_exception_is_reraised_with_worker_traceback(make_pool):
    pool = make_pool(SpawnRaises)
    with pytest.raises(KeyError, match="no such model") as info:
        pool.spawn()
    assert "in spawn" in str(info.value.__cause__)
    assert pool.stats().workers == ()  # nothing left behind (the fixture checks processes)
    with pytest.raises(NoWorkersError):
        pool.execute(1)


def test_worker_dying_during_spawn_raises_instead_of_hanging(make_pool):
    pool = make_pool(SpawnDies)
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match="died during spawn with exit code 9"):
        pool.spawn()
    assert time.monotonic() - t0 < 5


def test_spawn_timeout_kills_the_process(make_pool):
    pool = make_pool(SpawnHangs, spawn_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(SpawnTimeoutError) as info:
        pool.spawn(60)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 4


def test_unpicklable_spawn_arguments_fail_in_the_caller(make_pool):
    pool = make_pool(Echo)
    with pytest.raises(TypeError, match="pickle"):
        pool.spawn(threading.Lock())
    assert pool.stats().workers == ()


def test_failed_spawn_does_not_disturb_live_workers(make_pool):
    pool = make_pool(Echo)
    pool.spawn()
    with pytest.raises(TypeError):
        pool.spawn(unexpected_keyword=True)
    assert pool.execute("still here") == "still here"
    assert len(pool.stats().workers) == 1


def test_tasks_submitted_while_spawning_run_when_ready(make_pool):
    pool = make_pool(Echo)
    spawn = pool.submit_spawn(tag="late")
    task = pool.submit_execute("queued before ready")
    assert task.result(timeout=30) == "queued before ready"
    assert spawn.result(timeout=1)["tag"] == "late"
