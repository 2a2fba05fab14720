"""A request's lifetime over a real socket: deadlines and clients that leave.

One server for the module: one worker that takes 0.5 s per image, one image per task
(``MAX_BATCH_SIZE=1``), ``REQUEST_TIMEOUT_S=2``, and a record of every image that reached
the worker (``RECORD_FILE``), so "never ran" is checked from outside the server. Deadline
admission is off (``ADMISSION_HEADROOM=0``): these requests are queued on purpose, to see
what the queue does with a deadline that passes; refusing them at once is
``test_app_admission.py``'s.
"""

from __future__ import annotations

import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_helpers import http_client, image_bytes, running_app, serve, settings, wait_ready
from procs import wait_until

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("lifetime")
    record = tmp / "ran.txt"
    record.touch()
    with serve(tmp, WORKER_CLASS="app_helpers:RecordingSlowWorker", NUM_WORKERS="1",
               MAX_BATCH_SIZE="1", REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
               ADMISSION_HEADROOM="0",
               RECORD_FILE=str(record)) as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        yield http, record


def images(*seeds: int) -> list[bytes]:
    return [image_bytes("PNG", (32, 24), seed) for seed in seeds]


def files(datas: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(datas)]


def ran(record: Path) -> set[str]:
    return set(record.read_text().split())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metric(http: httpx.Client, name: str) -> float:
    return metric_of(http, name)


def idle(http: httpx.Client) -> bool:
    return metric(http, "pool_in_flight") == 0


def post_in_thread(pool: ThreadPoolExecutor, url: str, datas: list[bytes]) -> Any:
    def post() -> httpx.Response:
        with http_client(url) as other:
            return other.post("/predict", files=files(datas))
    return pool.submit(post)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "", "1e999", "1e-300"])
def test_a_bad_deadline_header_is_answered_422_naming_it(server, value):
    http, record = server
    before = ran(record)
    response = http.post("/predict", files=files(images(900)),
                         headers={"X-Request-Timeout": value})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["header", "X-Request-Timeout"]
    assert problem["msg"]
    assert ran(record) == before  # nothing was submitted


def test_a_deadline_header_that_leaves_time_changes_nothing(server):
    http, _ = server
    response = http.post("/predict", files=files(images(901)),
                         headers={"X-Request-Timeout": "30.5"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["sha256"] == sha(images(901)[0])


def test_a_task_whose_deadline_passes_in_the_queue_never_reaches_a_worker(server):
    http, record = server
    blocker, [victim] = images(1, 2), images(3)
    expired_before = metric(http, "http_requests_expired_total")
    with ThreadPoolExecutor(1) as threads:
        busy = post_in_thread(threads, str(http.base_url), blocker)  # 1 s of work
        assert wait_until(lambda: metric(http, "pool_busy_workers") == 1, timeout=10)
        response = http.post("/predict", files=files([victim]),
                             headers={"X-Request-Timeout": "0.2"})
        assert busy.result(timeout=30).status_code == 200
    assert response.status_code == 504, response.text
    detail = response.json()["detail"]
    assert "0.2 s (X-Request-Timeout)" in detail, detail
    assert wait_until(lambda: idle(http), timeout=10)
    assert sha(victim) not in ran(record)
    assert {sha(b) for b in blocker} <= ran(record)
    assert metric(http, "http_requests_expired_total") == expired_before + 1


def test_the_header_cannot_extend_request_timeout_s(server):
    http, record = server
    datas = images(11, 12, 13, 14, 15, 16)  # 3 s of work, against a 2 s limit
    response = http.post("/predict", files=files(datas), headers={"X-Request-Timeout": "30"})
    assert response.status_code == 504, response.text
    assert f"{REQUEST_TIMEOUT_S} s (REQUEST_TIMEOUT_S)" in response.json()["detail"]
    assert wait_until(lambda: idle(http), timeout=10)
    assert sha(datas[-1]) not in ran(record)


def test_a_client_that_leaves_takes_its_queued_tasks_with_it(server):
    http, record = server
    datas = images(21, 22, 23, 24, 25, 26)  # 3 s of work if it all ran
    abandoned_before = metric(http, "http_requests_abandoned_total")
    request = http.build_request("POST", "/predict", files=files(datas))
    raw = (f"POST /predict HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()
                     if k.lower() != "host")
           + "\r\n").encode() + request.read()
    with socket.create_connection((request.url.host, request.url.port), timeout=10) as sock:
        sock.sendall(raw)
        assert wait_until(lambda: metric(http, "pool_in_flight") == len(datas), timeout=10)
    left = time.monotonic()
    # The first image runs on (0.5 s); the five queued ones leave the queue at once.
    assert wait_until(lambda: idle(http), timeout=10)
    assert time.monotonic() - left < 2.0
    assert not {sha(d) for d in datas[1:]} & ran(record)
    assert wait_until(
        lambda: metric(http, "http_requests_abandoned_total") == abandoned_before + 1,
        timeout=5)
    # The server keeps serving.
    assert http.post("/predict", files=files(images(27))).status_code == 200


def http_requests_total(http: httpx.Client, status: int) -> float:
    prefix = f'http_requests_total{{method="POST",route="/predict",status="{status}"}} '
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[1]) if lines else 0.0


def test_a_client_that_leaves_mid_upload_is_counted_as_gone_not_as_a_bad_request(server):
    http, _ = server
    before = {status: http_requests_total(http, status) for status in (400, 499)}
    abandoned_before = metric(http, "http_requests_abandoned_total")
    body = http.build_request("POST", "/predict", files=files(images(41))).read()
    boundary = body.split(b"\r\n", 1)[0][2:].decode()
    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=10) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
                     .encode() + body[: len(body) // 2])
        time.sleep(0.2)  # the server is reading the body when the client goes
    assert wait_until(
        lambda: metric(http, "http_requests_abandoned_total") == abandoned_before + 1,
        timeout=5)
    assert http_requests_total(http, 499) == before[499] + 1
    assert http_requests_total(http, 400) == before[400]  # nobody sent a bad request
    assert http.post("/predict", files=files(images(42))).status_code == 200


def test_while_the_queue_stays_full_a_post_is_refused_before_its_body_is_read():
    with running_app(settings(worker_class="app_helpers:SlowerEchoWorker", queue_size=1,
                              max_batch_size=1)) as client, ThreadPoolExecutor(2) as threads:
        def post(data: bytes) -> httpx.Response:
            return client.post("/predict", files=files([data]))

        running = threads.submit(post, images(31)[0])  # 2 s on the worker
        assert wait_until(lambda: metric_of(client, "pool_busy_workers") == 1, timeout=10)
        queued = threads.submit(post, images(32)[0])  # fills the queue (QUEUE_SIZE=1)
        assert wait_until(lambda: metric_of(client, "pool_queue_depth") == 1, timeout=10)
        refused = post(images(33)[0])
        assert refused.status_code == 503, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        # Not an image: read, it would be 415; refused before the read, it is 503.
        early = client.post("/predict", files=[("files", ("x.png", b"not an image",
                                                          "image/png"))])
        assert early.status_code == 503, early.text
        assert "queue full" in early.json()["detail"]
        assert running.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200
        # The queue has room again: the same bad upload gets its own answer.
        assert client.post("/predict", files=[("files", ("x.png", b"not an image",
                                                         "image/png"))]).status_code == 415


def metric_of(client: Any, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
