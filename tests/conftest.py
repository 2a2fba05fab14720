"""Shared fixtures: every pool is shut down, and no test leaves a child process behind.

Helpers live in ``tests/support/`` (on the path through pytest's ``pythonpath``):
``procs`` (processes, waits), ``workers`` (library worker classes), ``app_helpers`` (servers,
images, checkpoints for the app tests)."""

from __future__ import annotations

import pytest
from procs import child_pids, wait_until


@pytest.fixture(autouse=True)
def no_leaked_children():
    before = child_pids()
    yield
    leaked = set()
    if not wait_until(lambda: not (child_pids() - before), timeout=5.0):
        leaked = child_pids() - before
    assert not leaked, f"test left child processes behind: {sorted(leaked)}"


@pytest.fixture
def make_pool():
    """Build pools that are always shut down, even when the test fails."""
    from stateful_pool import SPool

    pools = []

    def make(*args, **kwargs):
        pool = SPool(*args, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(cancel_futures=True, timeout=5)
