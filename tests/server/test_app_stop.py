"""An idle server stops at once: Ctrl-C (SIGINT) and SIGTERM, started like ``make serve``
with 1 and 2 ViT workers (torch loaded in every process). Nothing may pay for interpreter
teardown or wait for workers with nothing to do."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from app_helpers import http_client, image_bytes, serve, wait_ready
from procs import pid_alive, wait_until

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", [1, 2])
def test_idle_server_exits_within_a_second_of_sigint_and_of_sigterm(tmp_path, workers):
    for sig in (signal.SIGINT, signal.SIGTERM):
        # One late sample on a busy 2-core machine (a scheduling hiccup) gets a second,
        # fresh server; two late ones fail. Quiet runs take 0.25-0.45 s.
        times = []
        for _ in range(2):
            times.append(stop_time(tmp_path, workers, sig))
            if times[-1] < 1.0:
                break
        assert min(times) < 1.0, f"{sig.name}: exited {times} s after the signal"


def stop_time(tmp_path, workers: int, sig: signal.Signals) -> float:
    """Seconds from ``sig`` to the exit of an idle server that has answered one request."""
    with serve(tmp_path, NUM_WORKERS=str(workers), MODEL_WEIGHTS="random") as (
            process, url, log):
        with http_client(url) as http:
            wait_ready(http, process, log)
            answer = http.post("/predict", files={"files": ("a.png", image_bytes("PNG"))})
            assert answer.status_code == 200
            pids = [w["pid"] for w in http.get("/v1/model").json()["workers"]]
        assert len(pids) == workers
        t0 = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert code == 0, log.read_text()
        assert not any(pid_alive(p) for p in pids)
        return elapsed


def test_a_server_still_loading_its_model_stops_at_once_on_sigterm(tmp_path):
    # Before: it waited for the model to load (up to SHUTDOWN_TIMEOUT_S) only to stop it.
    with serve(tmp_path, WORKER_CLASS="app_helpers:StuckSpawnWorker",
               SHUTDOWN_TIMEOUT_S="10") as (process, url, log), http_client(url) as http:
        def loading() -> bool:
            try:
                return http.get("/readyz").status_code == 503
            except httpx.TransportError:
                return False

        assert wait_until(loading, timeout=30), log.read_text()
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - t0 < 3.0


def test_a_sigterm_to_the_whole_process_group_drains_the_requests_in_flight(tmp_path):
    """systemd, process managers and ``kill -- -PGID`` signal every process of the group:
    the workers must not die mid-batch; the server drains, then stops them."""
    from concurrent.futures import ThreadPoolExecutor

    image = ("a.png", image_bytes("PNG", size=(32, 32)), "image/png")
    with serve(tmp_path, WORKER_CLASS="app_helpers:SlowEchoWorker", NUM_WORKERS="2",
               MAX_BATCH_SIZE="4", SHUTDOWN_TIMEOUT_S="20") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)

        def post(_: int) -> int:
            with http_client(url) as own:
                return own.post("/predict", files=[("files", image)] * 4).status_code

        with ThreadPoolExecutor(4) as clients:
            answers = [clients.submit(post, n) for n in range(4)]
            # Every request has reached the pool (4 x 4 images, queued or running) before
            # the signal: a client still connecting would be refused by the stopping server.
            assert wait_until(lambda: "pool_in_flight 16.0" in http.get("/metrics").text,
                              timeout=20), log.read_text()
            os.killpg(process.pid, signal.SIGTERM)
            statuses = [a.result(timeout=60) for a in answers]
        assert statuses == [200] * 4, log.read_text()
        assert process.wait(timeout=30) == 0, log.read_text()
        assert "lost" not in log.read_text()
