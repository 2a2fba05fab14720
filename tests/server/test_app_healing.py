"""A server that heals itself: a crash loop slows the respawns down but never leaves a slot
empty for good, a worker that failed to start is tried again, stalled clients are cut off,
and connections past the limit are refused at once."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
from app_helpers import (
    http_client,
    image_bytes,
    running_app,
    serve,
    settings,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.slow

ECHO = "app.examples.echo_worker:EchoWorker"
IMAGE = ("a.png", image_bytes("PNG", size=(32, 32)), "image/png")


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in the metrics"
    return float(found.group(1))


def test_a_crash_loop_backs_off_and_the_server_returns_to_full_capacity():
    with running_app(settings(worker_class=ECHO, num_workers=2, restart_backoff_s=2.0,
                              restart_backoff_max_s=4.0)) as client:
        pool = client.app.state.server.pool
        # The pool allows 5 respawns within 60 s; the 6th crash spends the budget.
        for _ in range(6):
            assert wait_until(lambda: pool.stats().workers[0].state in ("idle", "busy"),
                              timeout=30), pool.stats().workers[0]
            os.kill(pool.stats().workers[0].pid, signal.SIGKILL)
            assert wait_until(lambda: pool.stats().workers[0].state != "idle", timeout=10)
        assert wait_until(lambda: pool.stats().workers[0].state == "backing_off", timeout=10)

        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text  # worker 1 still serves
        body = ready.json()
        assert body["status"] == "degraded" and body["workers_ready"] == 1
        assert re.search(r"worker 0 backing off \(next try in \d+ s\): died with signal "
                         "SIGKILL", body["reason"]), body
        info = client.get("/v1/model").json()["workers"][0]
        assert info["state"] == "backing_off" and 0 < info["restart_in_s"] <= 2
        assert info["last_failure"] == "died with signal SIGKILL"
        metrics = client.get("/metrics").text
        assert metric(metrics, 'pool_workers{state="backing_off"}') == 1
        assert 0 < metric(metrics, 'pool_worker_restart_in_seconds{worker_id="0"}') <= 2
        assert client.post("/predict", files=[("files", IMAGE)]).status_code == 200

        # After its back-off the slot comes back: full capacity again, for good.
        assert wait_until(lambda: client.get("/readyz").json()["workers_ready"] == 2,
                          timeout=30)
        assert client.get("/readyz").json()["status"] == "ready"
        assert all(w.state in ("idle", "busy") for w in pool.stats().workers)


def test_a_worker_that_failed_to_start_is_tried_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAKY_SPAWN_MARKER", str(tmp_path / "failed-once"))
    flaky = "app_helpers:FlakySpawnWorker"
    with running_app(settings(worker_class=flaky, num_workers=2, restart_backoff_s=1.5),
                     wait_ready=False) as client:
        assert wait_until(lambda: client.get("/readyz").json().get("status") == "degraded",
                          timeout=60), client.get("/readyz").json()
        body = client.get("/readyz").json()
        assert "worker 1 failed to start" in body["reason"]
        assert "CUDA out of memory (simulated)" in body["reason"]
        failed = [w for w in client.get("/v1/model").json()["workers"]
                  if w["state"] == "failed_to_start"]
        assert len(failed) == 1 and failed[0]["worker_index"] == 1
        assert metric(client.get("/metrics").text, "server_workers_failed_to_start") == 1
        assert wait_until(lambda: client.get("/readyz").json()["status"] == "ready",
                          timeout=30), client.get("/readyz").json()
        assert client.get("/readyz").json()["workers_ready"] == 2
        assert metric(client.get("/metrics").text, "server_workers_failed_to_start") == 0


def _stalled_upload(port: int) -> socket.socket:
    """The head of a multipart POST and the first bytes of its body; then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: multipart/form-data; boundary=x\r\n"
                 b"Content-Length: 100000\r\n\r\n--x\r\n")
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_uploads_get_408_and_their_connections_are_closed(tmp_path):
    with serve(tmp_path, WORKER_CLASS=ECHO, BODY_TIMEOUT_S="1.5") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        stalled = [_stalled_upload(port) for _ in range(50)]
        try:
            assert http.get("/healthz").status_code == 200  # meanwhile, the server answers
            answers = [_read_until_closed(sock, timeout=10) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
        elapsed = time.monotonic() - started
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0]
        assert b"BODY_TIMEOUT_S" in answers[0]
        assert elapsed < 6, f"the stalled uploads were held {elapsed:.1f} s"
        metrics = http.get("/metrics").text
        assert metric(metrics, 'http_requests_total{method="POST",route="/predict",'
                               'status="408"}') == 50
        assert http.post("/predict", files=[("files", IMAGE)]).status_code == 200


def test_connections_past_the_limit_are_refused_at_once(tmp_path):
    with serve(tmp_path, WORKER_CLASS=ECHO, MAX_CONNECTIONS="20",
               BODY_TIMEOUT_S="3") as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        assert http.get("/healthz").status_code == 200  # a kept-alive connection, opened first
        port = int(url.rsplit(":", 1)[1])
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
        try:
            time.sleep(0.5)
            closed = []
            for sock in silent:
                sock.settimeout(0.05)
                try:
                    closed.append(sock.recv(1) == b"")
                except TimeoutError:
                    closed.append(False)
            # 19 silent ones fit beside the probe's connection; the rest were closed at once.
            assert closed.count(True) == 11, closed
            assert http.get("/healthz").status_code == 200
            # The silent ones that fit are closed once BODY_TIMEOUT_S has passed.
            for sock in silent:
                assert _read_until_closed(sock, timeout=10) == b""
        finally:
            for sock in silent:
                sock.close()
        with http_client(url) as fresh:
            assert fresh.get("/healthz").status_code == 200
        metrics = http.get("/metrics").text
        assert metric(metrics, "http_connections_refused_total") == 11
        assert metric(metrics, "http_connections_silent_total") == 19
