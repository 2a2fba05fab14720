"""``API_PROCESSES=2``: two uvicorn processes on one port in front of one pool, over a real
socket, as ``python -m app`` runs them."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from app_helpers import http_client, image_bytes, serve, wait_ready, wait_until
from procs import pid_alive

from benchmarks.proc_cpu import children_running

pytestmark = pytest.mark.slow

ECHO = "app.examples.echo_worker:EchoWorker"


def api_pids(supervisor: int) -> set[int]:
    """The supervisor's API processes (its other children are the pool's workers)."""
    return set(children_running(supervisor, b"api_process"))


def post(url: str, image: tuple[str, bytes, str]) -> int:
    with http_client(url) as own:
        try:
            return own.post("/predict", files={"files": image}).status_code
        except httpx.TransportError:
            return -1  # its connection was on the killed API process


def test_two_api_processes_serve_survive_a_killed_one_and_a_killed_worker(tmp_path):
    with serve(tmp_path, API_PROCESSES="2", WORKER_CLASS=ECHO, NUM_WORKERS="2",
               MAX_BATCH_SIZE="4", LOG_LEVEL="warning") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        assert wait_until(lambda: len(api_pids(process.pid)) == 2, 30)
        first = api_pids(process.pid)
        image = ("a.jpg", image_bytes(), "image/jpeg")
        stop = threading.Event()

        def one_client(_: int) -> list[int]:
            statuses = []
            while not stop.is_set() or len(statuses) < 3:
                statuses.append(post(url, image))
            return statuses

        with ThreadPoolExecutor(6) as clients:
            running = [clients.submit(one_client, n) for n in range(6)]
            # An API process killed under load: restarted, the other serves on.
            time.sleep(0.5)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: len(api_pids(process.pid)) == 2
                              and victim not in api_pids(process.pid), 30), log.read_text()
            # A pool worker killed under load: only the requests it held fail.
            workers = http.get("/v1/model").json()["workers"]
            os.kill(workers[0]["pid"], signal.SIGKILL)
            assert wait_until(lambda: http.get("/readyz").json().get("workers_ready") == 2,
                              60)
            time.sleep(0.5)
            stop.set()
            statuses = [s for f in running for s in f.result(timeout=120)]
        assert set(statuses) <= {200, 500, -1}, statuses
        assert statuses.count(500) <= 4  # the one batch the killed worker held
        assert statuses.count(-1) <= 6  # the connections the killed API process held
        assert statuses.count(200) >= len(statuses) - 10
        # Both API processes serve: the restarted one too (a fresh connection each time).
        for _ in range(20):
            assert post(url, image) == 200
        metrics = http.get("/metrics").text
        served = re.search(r'^http_requests_total\{method="POST",route="/predict",'
                           r'status="200"\} (\d+)\.0$', metrics, re.MULTILINE)
        # Merged across the API processes (the killed one's files count too).
        assert served and int(served.group(1)) >= statuses.count(200) + 20 - 1
        assert re.search(r"^pool_worker_restarts_total 1\.0$", metrics, re.MULTILINE)
        pids = api_pids(process.pid) | {w["pid"] for w in http.get("/v1/model").json()["workers"]}

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10)


def test_sigterm_drains_every_api_process_then_stops_the_workers(tmp_path):
    with serve(tmp_path, API_PROCESSES="2", WORKER_CLASS="app_helpers:SlowEchoWorker",
               NUM_WORKERS="2", MAX_BATCH_SIZE="1") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        assert wait_until(lambda: http.get("/readyz").json()["workers_ready"] == 2, 30)
        image = ("a.png", image_bytes("PNG", (16, 16)), "image/png")
        with ThreadPoolExecutor(6) as clients:
            pending = [clients.submit(post, url, image) for _ in range(6)]
            assert wait_until(lambda: "pool_in_flight 6.0" in http.get("/metrics").text, 10)
            pids = api_pids(process.pid)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError), http_client(url) as late:
                late.get("/healthz")  # no new connections while draining
            assert [f.result(timeout=30) for f in pending] == [200] * 6
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - started >= 1.0  # 6 x 0.5 s on 2 workers: it waited
        assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10)
        assert "workers stopped" in log.read_text()


def test_two_api_processes_serve_every_model_of_a_models_file(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(f'[models.echo]\nworker_class = "{ECHO}"\ndevices = ["cpu"]\n\n'
                      '[models.pairs]\nworker_class = "app_helpers:PairWorker"\n'
                      'devices = ["cpu"]\n')
    with serve(tmp_path, API_PROCESSES="2", MODELS_FILE=str(models), API_KEY="k",
               LOG_LEVEL="warning") as (process, url, log), http_client(url) as http:
        http.headers["Authorization"] = "Bearer k"
        wait_ready(http, process, log)
        assert http.get("/readyz").json()["models"]["pairs"]["ready"]
        image = ("a.png", image_bytes("PNG", (24, 16)), "image/png")
        for _ in range(4):  # fresh connections: both API processes answer
            with http_client(url) as own:
                own.headers["Authorization"] = "Bearer k"
                echoed = own.post("/models/echo/predict", files={"files": image})
                paired = own.post("/models/pairs/predict", files={"request": image})
                assert echoed.json()["predictions"][0]["width"] == 24, echoed.text
                assert paired.json()["widths"] == [24], paired.text
        refused = http.post("/admin/models/echo/reload")
        assert refused.status_code == 409 and "API_PROCESSES" in refused.json()["detail"]
        assert 'pool_tasks_total{model="pairs",outcome="completed"}' in http.get("/metrics").text
