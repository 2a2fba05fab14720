"""Admission under load, from the client's side: a request that cannot finish before its
deadline is refused at once (503, Retry-After), one that can is served; a request whose item
killed a worker is not handed to another one."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from app_helpers import image_bytes, running_app, settings
from procs import wait_until

CLIENTS = 8  # each in a closed loop: about 8 images waiting at 0.25 s each, 2 s of work


def post(client: Any, seed: int = 0, width: int = 8, **headers: str) -> Any:
    image = ("a.png", image_bytes("PNG", (width, 8), seed), "image/png")
    return client.post("/predict", files=[("files", image)], headers=headers)


def refused_total(client: Any, reason: str) -> float:
    pattern = rf'^http_requests_refused_total\{{reason="{reason}"\}} (\S+)$'
    match = re.search(pattern, client.get("/metrics").text, re.MULTILINE)
    assert match, f"no http_requests_refused_total for {reason}"
    return float(match.group(1))


@pytest.mark.slow
def test_a_request_that_cannot_finish_in_time_is_refused_at_once_and_one_that_can_is_served():
    with running_app(settings(worker_class="app_helpers:QuarterEchoWorker", max_batch_size=1,
                              request_timeout_s=30)) as client, \
            ThreadPoolExecutor(CLIENTS) as threads:
        assert refused_total(client, "deadline") == 0  # every reason is there from the start
        stop = threading.Event()

        def keep_posting(n: int) -> list[int]:
            statuses = []
            while not stop.is_set():
                statuses.append(post(client, seed=n).status_code)
            return statuses

        background = [threads.submit(keep_posting, n) for n in range(CLIENTS)]
        try:
            # The first answers measure the drain rate: until then nothing is refused on a
            # guess, and a short deadline may still be queued (and expire).
            time.sleep(1.5)
            short: list[Any] = []

            def refused_at_once() -> bool:
                started = time.monotonic()
                response = post(client, seed=99, **{"X-Request-Timeout": "1.5"})
                short.append((response, time.monotonic() - started))
                return response.status_code == 503

            assert wait_until(refused_at_once, timeout=20), [r.status_code for r, _ in short]
            response, took = short[-1]
            assert took < 0.5, f"refused after {took:.2f} s, not at once"
            assert "within its deadline of 1.5 s (X-Request-Timeout)" in response.json()[
                "detail"], response.text
            assert 1 <= int(response.headers["retry-after"]) <= 30
            # The same request with time enough for the queue ahead of it is served.
            started = time.monotonic()
            assert post(client, seed=98, **{"X-Request-Timeout": "10"}).status_code == 200
            assert time.monotonic() - started < 10
            assert refused_total(client, "deadline") == sum(
                r.status_code == 503 for r, _ in short)
        finally:
            stop.set()
        statuses = [s for f in background for s in f.result(timeout=30)]
        # The clients with the server's 30 s deadline were never refused nor expired.
        assert set(statuses) == {200}, statuses


@pytest.mark.slow
def test_a_request_that_killed_its_worker_is_not_handed_to_another(caplog):
    caplog.set_level(logging.ERROR, logger="app.errors")
    with running_app(settings(worker_class="app_helpers:PoisonEchoWorker", num_workers=2,
                              max_batch_size=1)) as client:
        pool = client.app.state.server.pool
        response = post(client, width=13, **{"X-Request-ID": "poison-1"})
        assert response.status_code == 500, response.text
        assert "worker crashed" in response.json()["detail"]
        # Respawned once; had the item gone to the other worker, it would have died too.
        assert wait_until(lambda: client.get("/readyz").json().get("workers_ready") == 2,
                          timeout=60)
        assert post(client).status_code == 200
        stats = pool.stats()
        assert stats.restarts == 1
        assert sum(w.restarts for w in stats.workers) == 1
        assert "pool_worker_restarts_total 1.0" in client.get("/metrics").text
        [line] = [r.getMessage() for r in caplog.records if "crashed worker" in r.getMessage()]
        assert re.match(r"request poison-1 crashed worker \d+ \(pid \d+\)", line), line
        assert "exit code 3" in line


# ---- the estimate itself: a cold start or an idle spell refuses nothing -------------------

class FakePool:
    """What ``pool.stats()`` tells of the tasks run: counts, batches, run time, workers."""

    def __init__(self, workers: int = 2) -> None:
        self.tasks = self.batches = 0
        self.run_sum = 0.0
        self.workers = workers

    def ran(self, batches: int, size: int, seconds: float) -> None:
        """``batches`` batches of ``size`` tasks ran, ``seconds`` each."""
        self.batches += batches
        self.tasks += batches * size
        self.run_sum += batches * size * seconds

    def stats(self) -> Any:
        from stateful_pool import Histogram, PoolStats, WorkerState, WorkerStats
        workers = tuple(WorkerStats(n, 100 + n, WorkerState.BUSY, 0, 0, 1, None)
                        for n in range(self.workers))
        return PoolStats(workers=workers, queue_depth=0, in_flight=0, submitted=0,
                         completed=self.tasks, failed=0, cancelled=0, timed_out=0, restarts=0,
                         batches=self.batches, batch_size_mean=0.0, batch_size_max=0,
                         run_time=Histogram(sum=self.run_sum, count=self.tasks))


def test_the_rate_is_what_the_serving_workers_can_do_not_what_they_were_sent():
    from app.serving.errors import DrainRate

    pool = FakePool(workers=2)
    drain = DrainRate(pool.stats)
    assert drain.rate(0.0) is None  # nothing ran yet: no guess
    # A few lone images in 4 s, 0.1 s each: a light load, not a slow server.
    pool.ran(4, 1, 0.1)
    assert drain.rate(4.0) == pytest.approx(2 * 10)
    # Batches of 16 in 0.8 s each: 20 tasks/s per worker.
    pool.ran(10, 16, 0.8)
    assert drain.rate(10.0) == pytest.approx(2 * 20)
    pool.workers = 1  # one killed: half the capacity at once
    assert drain.rate(10.5) == pytest.approx(20)
    pool.workers = 2  # respawned; then a quiet minute: the last measure holds
    assert drain.rate(70.0) == pytest.approx(40)
    pool.workers = 0
    assert drain.rate(71.0) is None


def test_admission_refuses_only_on_a_measured_rate_and_with_headroom():
    from app.serving.errors import ADMISSION_HEADROOM, LoadShedder

    pool = FakePool(workers=1)
    counted: list[str] = []
    shedder = LoadShedder(pool.stats, counted.append)
    with shedder.hold(100):
        assert shedder.admit(1, 0.01, "x") is None  # cold start: no rate, no refusal
        shedder.drain._next_at = 0.0
        pool.ran(5, 10, 0.2)  # 50 tasks/s
        shedder.drain.rate(1.0)
        shedder.drain._next_at = float("inf")  # frozen at that: the test's clock, not ours
        # 101 items at 50/s: about 2 s of work.
        assert shedder.admit(1, 2.02 * ADMISSION_HEADROOM + 0.01, "x") is None
        refused = shedder.admit(1, 2.02 * ADMISSION_HEADROOM - 0.05, "5 s (REQUEST_TIMEOUT_S)")
        assert refused is not None and refused.status == 503
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        assert counted == ["deadline"]
    assert shedder.in_flight == 0
