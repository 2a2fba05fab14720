"""The server as ``make serve`` runs it: ``python -m app``, a real uvicorn socket on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from app_fixtures import TINY, image_bytes, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Start ``python -m app`` like ``make serve``; always stopped (and its group) on exit."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_"))}
    full_env.update(HOST="127.0.0.1", PORT=str(port), MODEL_NAME=TINY, DEVICE="cpu",
                    PYTHONPATH=str(ROOT / "tests"), **env)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=full_env,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=60, trust_env=False)


def wait_ready(http: httpx.Client, process: subprocess.Popen[bytes], log: Path,
               timeout: float = 120) -> None:
    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(ready, timeout, interval=0.2), log.read_text()


def test_make_serve_offline_starts_with_random_weights_and_serves(tmp_path):
    # MODEL_WEIGHTS left at auto; the "hub" is a closed local port, as on a machine offline.
    with serve(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               HF_HOME=str(tmp_path / "hf")) as (process, url, log), client(url) as http:
        wait_ready(http, process, log)
        response = http.post("/predict", params={"top_k": 3},
                             files={"files": ("cat.jpg", image_bytes(), "image/jpeg")})
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"][0]["top_k"]) == 3
        # The access line is written once the response has gone out: give it a moment.
        request_id = response.headers["x-request-id"]
        assert wait_until(lambda: request_id in log.read_text(), 10), log.read_text()
        [worker] = http.get("/v1/model").json()["workers"]
        assert worker["weights"] == "random"
        assert "pretrained weights unavailable" in worker["weights_source"]
        text = log.read_text()
        assert "WARNING" in text and "RANDOM weights" in text
        assert healthcheck(url) == 0  # the Docker HEALTHCHECK

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert wait_until(lambda: not pid_alive(worker["pid"]), timeout=5)
        assert "workers stopped" in log.read_text()
        assert healthcheck(url) == 1


def healthcheck(url: str) -> int:
    env = {**os.environ, "PORT": url.rsplit(":", 1)[1]}
    return subprocess.run([sys.executable, "-m", "app.healthcheck"], cwd=ROOT, env=env,
                          capture_output=True, timeout=30).returncode


def test_sigterm_drains_accepted_requests_then_exits_0(tmp_path):
    # One worker taking 0.5 s per image: four requests need 2 s, SIGTERM comes after 0.3.
    with serve(tmp_path, WORKER_CLASS="app_fixtures:SlowEchoWorker", NUM_WORKERS="1",
               MAX_BATCH_SIZE="1") as (process, url, log), client(url) as http:
        wait_ready(http, process, log)
        image = ("a.png", image_bytes("PNG", (16, 16)), "image/png")
        def one_request() -> httpx.Response:
            with client(url) as own:
                return own.post("/predict", files={"files": image})

        with ThreadPoolExecutor(4) as clients:
            pending = [clients.submit(one_request) for _ in range(4)]
            assert wait_until(lambda: "pool_in_flight 4.0" in http.get("/metrics").text,
                              timeout=10)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError), client(url) as late:
                late.get("/healthz")  # no new connections while draining
            responses = [f.result(timeout=30) for f in pending]
        assert [r.status_code for r in responses] == [200] * 4
        assert process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - started >= 1.0  # it waited for the work, did not drop it


def test_invalid_settings_exit_2_before_anything_starts(tmp_path):
    with serve(tmp_path, MODEL_WEIGHTS=str(tmp_path / "missing.pth")) as (process, _, log):
        assert process.wait(timeout=60) == 2
        assert "model_weights" in log.read_text()


def test_server_exits_1_when_no_worker_can_start(tmp_path):
    with serve(tmp_path, WORKER_CLASS="app_fixtures:BrokenSpawnWorker") as (process, _, log):
        assert process.wait(timeout=60) == 1
        assert "no model worker could start" in log.read_text()
