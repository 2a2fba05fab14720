"""The server as ``make serve`` runs it: ``python -m app``, a real uvicorn socket on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from app_helpers import (
    ROOT,
    free_port,
    http_client,
    image_bytes,
    serve,
    wait_ready,
    wait_until,
)
from procs import pid_alive

pytestmark = pytest.mark.slow


def client(base_url: str) -> httpx.Client:
    return http_client(base_url)


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
        info = http.get("/v1/model").json()
        [worker] = info["workers"]
        assert worker["weights"] == "random" and info["random_weights"] is True
        ready = http.get("/readyz").json()
        assert ready["weights"] == "random" and ready["random_weights"] is True
        assert 'model_random_weights{worker_id="0"} 1.0' in http.get("/metrics").text
        assert "pretrained weights unavailable" in worker["weights_source"]
        text = log.read_text()
        assert "WARNING" in text and "RANDOM weights" in text
        assert "Retrying" not in text  # offline mode settled before huggingface_hub loaded
        assert healthcheck(url) == 0  # the Docker HEALTHCHECK

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        assert wait_until(lambda: not pid_alive(worker["pid"]), timeout=5)
        assert "workers stopped" in log.read_text()
        assert healthcheck(url) == 1


def test_pretrained_weights_that_cannot_load_stop_the_server(tmp_path):
    # The image's default (MODEL_WEIGHTS=pretrained): never serve random weights silently.
    # The unreachable hub is found at once (no minute of retries) and the server exits 1.
    with serve(tmp_path, MODEL_WEIGHTS="pretrained", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               HF_HOME=str(tmp_path / "hf")) as (process, _, log):
        assert process.wait(timeout=60) == 1, log.read_text()
    text = log.read_text()
    assert "no model worker could start" in text and "RANDOM" not in text


def healthcheck(url: str) -> int:
    env = {**os.environ, "PORT": url.rsplit(":", 1)[1]}
    return subprocess.run([sys.executable, "-m", "app.healthcheck"], cwd=ROOT, env=env,
                          capture_output=True, timeout=30).returncode


def test_sigterm_drains_accepted_requests_then_exits_0(tmp_path):
    # One worker taking 0.5 s per image: four requests need 2 s, SIGTERM comes after 0.3.
    with serve(tmp_path, WORKER_CLASS="app_helpers:SlowEchoWorker", NUM_WORKERS="1",
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


def test_sigterm_waits_a_fractional_shutdown_timeout_then_answers_503(tmp_path):
    # SHUTDOWN_TIMEOUT_S=0.9: the 0.5 s request finishes, the 3 s one does not, and its client
    # is told why in JSON.
    with serve(tmp_path, WORKER_CLASS="app_helpers:WidthDelayEchoWorker", NUM_WORKERS="2",
               MAX_BATCH_SIZE="1", SHUTDOWN_TIMEOUT_S="0.9") as (process, url, log), \
            client(url) as http:
        wait_ready(http, process, log)
        assert wait_until(lambda: http.get("/readyz").json()["workers_ready"] == 2, 30)

        def one_request(width: int) -> httpx.Response:
            image = ("a.png", image_bytes("PNG", (width, 8)), "image/png")
            with client(url) as own:
                return own.post("/predict", files={"files": image})

        with ThreadPoolExecutor(2) as clients:
            short, long = clients.submit(one_request, 50), clients.submit(one_request, 300)
            assert wait_until(lambda: "pool_busy_workers 2.0" in http.get("/metrics").text,
                              timeout=10)
            process.send_signal(signal.SIGTERM)
            assert short.result(timeout=30).status_code == 200
            refused = long.result(timeout=30)
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["detail"]
        assert process.wait(timeout=30) == 0, log.read_text()
        assert "Exception in ASGI application" not in log.read_text()


def test_invalid_settings_exit_2_before_anything_starts(tmp_path):
    with serve(tmp_path, MODEL_WEIGHTS=str(tmp_path / "missing.pth")) as (process, _, log):
        assert process.wait(timeout=60) == 2
        assert "model_weights" in log.read_text()


def test_a_port_in_use_stops_the_server_with_exit_3_naming_the_address(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with serve(tmp_path, PORT=str(port),
                   WORKER_CLASS="app.examples.echo_worker:EchoWorker") as (process, _, log):
            assert process.wait(timeout=60) == 3, log.read_text()
    assert f"('127.0.0.1', {port}): address already in use" in log.read_text()


def test_server_exits_1_when_no_worker_can_start(tmp_path):
    with serve(tmp_path, WORKER_CLASS="app_helpers:BrokenSpawnWorker") as (process, _, log):
        assert process.wait(timeout=60) == 1
        assert "no model worker could start" in log.read_text()


def test_spool_serve_help_lists_every_setting():
    result = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--model-weights", "[MODEL_WEIGHTS]", "--log-format", "[LOG_FORMAT]",
                   "--download-weights"):
        assert option in result.stdout


def test_the_distribution_ships_the_server_and_its_console_script(tmp_path):
    # A wheel, as `pip install 'stateful-pool[serve]'` would install it, built from a copy
    # (setuptools leaves build/ behind, whose stale files would leak into later wheels).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("stateful_pool", "app"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=120)
    [wheel] = tmp_path.glob("stateful_pool-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "spool-serve = app.__main__:run" in archive.read(entry_points).decode()
    for module in ("app/protocols/v2.py", "app/main.py", "app/examples/text.py",
                   "stateful_pool/py.typed"):
        assert module in names
    assert not any(n.startswith("tests/") for n in names)
