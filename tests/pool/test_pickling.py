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


@pytest.mark.parametrize(("command", "type_name", "says"), [
    # An exception's or a result's trip back to the parent; `says` maps a RemoteError
    # attribute ("str": its message) to a text it must contain.
    ("unpicklable_result", "_thread.lock", {"str": "could not be pickled"}),
    ("raise_unpicklable", "workers.UnpicklableError", {
        "remote_message": "carries a lock", "remote_traceback": "do_raise_unpicklable",
        "str": "workers.UnpicklableError: carries a lock"}),
    ("raise_unrebuildable", "workers.NeedsTwoArgs", {
        "remote_message": "first and second", "str": "could not be rebuilt"}),
    ("unrebuildable_result", "workers.Unloadable", {"str": "refuses to be rebuilt"}),
])
def test_what_cannot_come_back_fails_that_task_only(pool, command, type_name, says):
    """The caller gets a RemoteError that names the type and keeps the worker's message and
    traceback; the worker lives on and the next task is fine."""
    with pytest.raises(RemoteError) as info:
        pool.execute(command)
    err = info.value
    assert err.type_name == type_name
    for attribute, text in says.items():
        assert text in (str(err) if attribute == "str" else getattr(err, attribute))
    assert pool.execute("echo", 5) == 5
    assert pool.stats().restarts == 0
