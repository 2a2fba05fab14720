"""Many threads and an event loop submit while workers are being killed: every future
resolves exactly once, with its own result or a crash error, and nothing stays pending."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
from workers import Tasks

from stateful_pool import SPool, WorkerCrashedError

pytestmark = pytest.mark.slow


def test_concurrent_submitters_while_workers_are_killed():
    pool = SPool(Tasks, max_restarts=None, restart_backoff=0.01)
    for _ in range(3):
        pool.spawn()
    resolutions: dict[int, int] = {}
    lock = threading.Lock()
    outcomes: dict[int, object] = {}
    stop = threading.Event()

    def track(key, future):
        def done(f):
            with lock:
                resolutions[key] = resolutions.get(key, 0) + 1
        future.add_done_callback(done)

    def submitter(base):
        for i in range(150):
            key = base + i
            f = pool.submit_execute("sleep", random.choice([0, 0, 0.002]), key)
            track(key, f)
            outcomes[key] = f

    async def async_submitter():
        async def one(key):
            try:
                return await pool.async_execute("echo", key)
            except WorkerCrashedError:
                return "crashed"
        return await asyncio.gather(*(one(100_000 + i) for i in range(300)))

    def killer():
        rng = random.Random(7)
        while not stop.wait(0.05):
            pids = [w.pid for w in pool.stats().workers if w.state == "busy" and w.pid]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    try:
        k = threading.Thread(target=killer)
        k.start()
        threads = [threading.Thread(target=submitter, args=(n * 1000,)) for n in range(4)]
        for t in threads:
            t.start()
        async_results = asyncio.run(asyncio.wait_for(async_submitter(), 60))
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 60
        for key, f in outcomes.items():
            try:
                assert f.result(timeout=max(0.1, deadline - time.monotonic())) == key
            except WorkerCrashedError:
                pass
        stop.set()
        k.join(5)
        assert all(r in ("crashed", 100_000 + i) for i, r in enumerate(async_results))
        with lock:
            assert len(resolutions) == 600
            assert set(resolutions.values()) == {1}
        stats = pool.stats()
        assert stats.restarts > 0, "the killer never hit a worker; the test proved nothing"
        assert stats.queue_depth == 0 and stats.in_flight == 0
        assert stats.completed + stats.failed == stats.submitted
    finally:
        stop.set()
        pool.shutdown(cancel_futures=True, timeout=10)
