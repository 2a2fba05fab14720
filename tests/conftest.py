"""Shared fixtures: every pool is shut down, and no test leaves a child process behind."""

from __future__ import annotations

import os
import time

import pytest


def child_pids() -> set[int]:
    """Live children of this process, excluding multiprocessing's resource tracker."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"resource_tracker" in f.read():
                    continue
        except (OSError, IndexError, ValueError):
            continue
        found.add(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


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
