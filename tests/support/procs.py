"""Process helpers for the tests: the children of this process, whether a pid lives, and
bounded waits (a condition, a coroutine)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from loadtest.processes import live_processes

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent


def child_pids() -> set[int]:
    """Live children of this process, excluding multiprocessing's resource tracker."""
    me = os.getpid()
    return {pid for pid, parent, _ in live_processes() if parent == me and _counts(pid)}


def _counts(pid: int) -> bool:
    """Still there, and not the resource tracker (it outlives every pool by design)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" not in f.read()
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_async(coro, timeout: float = 30.0):
    """Run a coroutine on a new event loop; ``TimeoutError`` if it takes over ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
