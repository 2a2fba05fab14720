"""Objects that cannot cross the process boundary fail one task, clearly, and nothing else."""

from __future__ import annotations

import threading

import pytest
from workers import Tasks

from stateful_pool import RemoteError


@pytest.fixture(scope="module")
def pool():
    from stateful_pool import SPool

    p = SPool(Tasks)
    p.spawn()
    yield p
    p.shutdown()


def test_unpicklable_arguments_fail_in_the_caller_at_once(pool):
    with pytest.raises(TypeError, match="pickle"):
        pool.submit_execute("echo", threading.Lock())
    assert pool.stats().submitted == pool.stats().completed + pool.stats().failed
    assert pool.execute("echo", 1) == 1


def test_unpicklable_result_fails_that_task_only(pool):
    with pytest.raises(RemoteError) as info:
        pool.execute("unpicklable_result")
    err = info.value
    assert err.type_name == "_thread.lock"
    assert "could not be pickled" in str(err)
    assert pool.execute("echo", 2) == 2


def test_unpicklable_exception_keeps_type_message_and_traceback(pool):
    with pytest.raises(RemoteError) as info:
        pool.execute("raise_unpicklable")
    err = info.value
    assert err.type_name == "workers.UnpicklableError"
    assert err.remote_message == "carries a lock"
    assert "do_raise_unpicklable" in err.remote_traceback
    assert "workers.UnpicklableError: carries a lock" in str(err)
    assert pool.execute("echo", 3) == 3


def test_exception_that_cannot_be_rebuilt_in_the_parent(pool):
    with pytest.raises(RemoteError) as info:
        pool.execute("raise_unrebuildable")
    err = info.value
    assert err.type_name == "workers.NeedsTwoArgs"
    assert "first and second" in err.remote_message
    assert "could not be rebuilt" in str(err)
    assert pool.execute("echo", 4) == 4


def test_result_that_cannot_be_rebuilt_in_the_parent(pool):
    with pytest.raises(RemoteError) as info:
        pool.execute("unrebuildable_result")
    assert info.value.type_name == "workers.Unloadable"
    assert "refuses to be rebuilt" in str(info.value)
    assert pool.execute("echo", 5) == 5
    assert pool.stats().restarts == 0
