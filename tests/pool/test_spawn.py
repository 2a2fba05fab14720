"""Spawning: errors in spawn come back, deaths and hangs during spawn never hang the caller."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from procs import wait_until
from workers import Echo, SpawnDies, SpawnHangs, SpawnRaises

from stateful_pool import NoWorkersError, SpawnError, SpawnTimeoutError

ROOT = Path(__file__).resolve().parents[2]


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


# A user's script: its top-level imports (here a sleep standing in for `import torch`) run again
# in every spawned worker before the worker reads its spawn arguments.
SLOW_IMPORTS_SCRIPT = """
import os, time
time.sleep(float(os.environ.get("SLOW_IMPORT_S", "0")))

from stateful_pool import SPool, SpawnTimeoutError, SWorker

class Model(SWorker):
    def spawn(self, weights=b""):
        return len(weights)

    def execute(self, x):
        return x

if __name__ == "__main__":
    with SPool(Model, spawn_timeout=1.0) as pool:
        pool.spawn()
        os.environ["SLOW_IMPORT_S"] = "8"  # from now on, workers take 8 s to start
        t0 = time.monotonic()
        stuck = pool.submit_spawn(b"w" * (1 << 20))
        time.sleep(0.2)
        pool.submit_execute("x").result(timeout=5)
        print(f"served {time.monotonic() - t0 - 0.2:.2f}")
        try:
            stuck.result(timeout=30)
        except SpawnTimeoutError:
            print(f"spawn timed out {time.monotonic() - t0:.2f}")
"""


def test_large_spawn_arguments_hold_up_neither_the_pool_nor_spawn_timeout(tmp_path):
    """A new worker reads its spawn arguments only after re-importing the user's script
    (seconds with torch). Arguments larger than a pipe's buffer (weights sent as bytes) must
    not keep the other workers from serving meanwhile, nor keep spawn_timeout from killing
    the new one."""
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SLOW_IMPORTS_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    served, timed_out = out.stdout.splitlines()
    assert float(served.split()[-1]) < 0.5, out.stdout
    assert timed_out.startswith("spawn timed out") and float(timed_out.split()[-1]) < 3, (
        out.stdout)


def test_failed_spawns_with_large_arguments_leave_no_thread_behind(make_pool):
    """A service that retries a failing spawn (weights sent as bytes) must not grow a thread
    per attempt."""
    pool = make_pool(SpawnRaises)
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(TypeError):  # SpawnRaises.spawn takes no argument
            pool.spawn(b"w" * 200_000)
    assert wait_until(lambda: threading.active_count() <= before, timeout=2), (
        threading.enumerate())
