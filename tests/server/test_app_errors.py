"""Every way a request can be refused: the answer is a clear JSON error, the server goes on.

Limits and probes live in the API process, so most tests use the echo worker (no model) and
cost a fraction of a second each; the decode failures that need the real model are in
test_app_predict.py.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from app_helpers import image_bytes, png_header_only, running_app, settings, wait_until

from app.images import ALLOWED_FORMATS

ECHO = "app.examples.echo_worker:EchoWorker"
LIMIT_MB = 1


@pytest.fixture(scope="module")
def client():
    with running_app(settings(worker_class=ECHO, max_upload_mb=LIMIT_MB, max_files=3)) as c:
        yield c


def post_files(client, *files, **kwargs):
    return client.post("/predict", files=[("files", f) for f in files], **kwargs)


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    for word in words:
        assert word in str(detail), detail
    assert "Traceback" not in response.text


def test_a_valid_upload_is_echoed(client):
    data = image_bytes("PNG", size=(64, 48))
    response = post_files(client, ("a.png", data, "image/png"))
    assert response.status_code == 200
    [echo] = response.json()["predictions"]
    assert echo == {"filename": "a.png", "format": "PNG", "width": 64, "height": 48,
                    "bytes": len(data), "sha256": echo["sha256"]}


def test_no_files_field_is_422(client):
    assert_error(client.post("/predict", data={"image": "x"}), 422, "files")


def test_empty_body_is_422(client):
    assert_error(client.post("/predict"), 422, "files")
    assert_error(client.post("/predict", headers={"content-type": "multipart/form-data; "
                                                  "boundary=x"}, content=b""), 422, "files")


def test_zero_byte_file_is_400(client):
    assert_error(post_files(client, ("empty.jpg", b"", "image/jpeg")), 400, "empty.jpg",
                 "empty")


def test_bytes_that_are_not_an_image_are_415(client):
    assert_error(post_files(client, ("notes.txt", b"hello, not an image", "text/plain")),
                 415, "notes.txt", "JPEG")


def test_image_format_outside_the_allow_list_is_415(client):
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    assert "TIFF" not in ALLOWED_FORMATS
    assert_error(post_files(client, ("scan.tiff", buffer.getvalue(), "image/tiff")), 415)


def test_broken_header_of_an_allowed_format_is_400(client):
    data = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"garbage-garbage"
    assert_error(post_files(client, ("broken.png", data, "image/png")), 400, "broken.png")


@pytest.mark.parametrize("width, height", [
    (8000, 6000),    # 48 Mpx: over MAX_IMAGE_PIXELS (40 M), under Pillow's own limits
    (10000, 10000),  # 100 Mpx: where Pillow only warns (DecompressionBombWarning)
    (20000, 20000),  # 400 Mpx: where Pillow raises DecompressionBombError
])
def test_decompression_bomb_is_413_before_decoding(client, width, height):
    data = png_header_only(width, height)
    assert len(data) < 200  # the body is tiny; only the header claims the pixels
    assert_error(post_files(client, ("bomb.png", data, "image/png")), 413, "pixels")


def test_more_than_max_files_is_413(client):
    files = [(f"{n}.png", image_bytes("PNG", (16, 16)), "image/png") for n in range(4)]
    assert_error(post_files(client, *files), 413, "MAX_FILES")
    assert post_files(client, *files[:3]).status_code == 200


def big_multipart(size: int) -> tuple[bytes, str]:
    boundary = "limit-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_declared_body_over_max_upload_is_413(client):
    body, content_type = big_multipart(LIMIT_MB * 2**20 + 1)
    response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert_error(response, 413, "MAX_UPLOAD_MB")


def test_chunked_body_over_max_upload_is_413(client):
    body, content_type = big_multipart(3 * LIMIT_MB * 2**20)
    sent = []

    def chunks():  # a generator body goes out chunked, without Content-Length
        for start in range(0, len(body), 64 * 1024):
            sent.append(start)
            yield body[start:start + 64 * 1024]

    response = client.post("/predict", content=chunks(), headers={"content-type": content_type})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "MAX_UPLOAD_MB")


def test_chunked_body_under_the_limit_is_served(client):
    data = image_bytes("PNG", size=(32, 32))
    boundary = "ok-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"ok.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    response = client.post(
        "/predict", content=iter([body[:100], body[100:]]),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text


def test_top_k_out_of_range_is_422(client):
    response = post_files(client, ("a.png", image_bytes("PNG", (8, 8)), "image/png"),
                          params={"top_k": 0})
    assert_error(response, 422, "top_k")


def test_server_still_serves_after_every_refusal(client):
    assert client.get("/readyz").status_code == 200
    assert post_files(client, ("a.png", image_bytes("PNG", (8, 8)), "image/png")
                      ).status_code == 200


# ---- access ------------------------------------------------------------------------------

def test_api_key_guards_predict_and_model_info_but_not_the_probes():
    with running_app(settings(worker_class=ECHO, api_key="s3cret")) as client:
        image = ("a.png", image_bytes("PNG", (8, 8)), "image/png")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic czNjcmV0"}):
            response = post_files(client, image, headers=headers)
            assert_error(response, 401, "API key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/model", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert post_files(client, image, headers=good).status_code == 200
        assert client.get("/v1/model", headers=good).status_code == 200
        for probe in ("/healthz", "/readyz", "/metrics", "/v2/health/live"):
            assert client.get(probe).status_code == 200, probe
        # The Open Inference Protocol routes answer a refused key in their own error shape.
        for method, path in (("GET", "/v2/models/any"), ("POST", "/v2/models/any/infer")):
            response = client.request(method, path, content=b"{}")
            assert response.status_code == 401, response.text
            assert response.json() == {"error": "missing or invalid API key"}
            assert response.headers["www-authenticate"] == "Bearer"
            passed = client.request(method, path, content=b"{}", headers=good)
            assert passed.status_code == 404 and "unknown model 'any'" in passed.json()["error"]


# ---- the pool's refusals -----------------------------------------------------------------

def test_full_queue_is_503_with_retry_after():
    with running_app(settings(worker_class="app_helpers:SlowEchoWorker", queue_size=1,
                              max_batch_size=1)) as client:
        image = ("a.png", image_bytes("PNG", (8, 8)), "image/png")
        # One request runs (0.5 s), one waits in the queue; the others find it full.
        with ThreadPoolExecutor(4) as clients:
            responses = list(clients.map(lambda _: post_files(client, image), range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 503, 503], statuses
        for response in responses:
            if response.status_code == 503:
                assert_error(response, 503, "queue full")
                assert response.headers["retry-after"] == "1"
        assert post_files(client, image).status_code == 200
        # More images than the queue holds can never be admitted: no "retry", a 413.
        assert_error(post_files(client, image, image), 413, "2 items", "QUEUE_SIZE=1")
        assert post_files(client, image).status_code == 200


def test_request_past_its_deadline_is_504_and_the_server_goes_on():
    with running_app(settings(worker_class="app_helpers:SlowEchoWorker",
                              request_timeout_s=0.2)) as client:
        image = ("a.png", image_bytes("PNG", (8, 8)), "image/png")
        assert_error(post_files(client, image), 504, "REQUEST_TIMEOUT_S")
        time.sleep(0.5)  # let the worker finish the abandoned task
        assert client.get("/readyz").status_code == 200


def test_a_hung_worker_is_killed_and_respawned_after_hang_timeout_s():
    with running_app(settings(worker_class="app_helpers:HangingEchoWorker",
                              request_timeout_s=0.5, hang_timeout_s=1.5)) as client:
        hang = ("a.png", image_bytes("PNG", (13, 8)), "image/png")
        image = ("b.png", image_bytes("PNG", (8, 8)), "image/png")
        assert_error(post_files(client, hang), 504, "REQUEST_TIMEOUT_S")
        # Before: the worker stayed busy for good, every request 504, /readyz 200 all along.
        assert wait_until(lambda: post_files(client, image).status_code == 200, timeout=15)
        assert "pool_worker_restarts_total 1.0" in client.get("/metrics").text


def test_no_worker_ready_yet_is_503_while_liveness_is_200():
    with running_app(settings(worker_class="app_helpers:SlowSpawnWorker"),
                     wait_ready=False) as client:
        ready = client.get("/readyz")
        assert_error(ready, 503, "loading")
        image = ("a.png", image_bytes("PNG", (8, 8)), "image/png")
        response = post_files(client, image)
        assert_error(response, 503, "loading")
        assert response.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200


def test_workers_that_cannot_start_fail_readiness_and_liveness():
    with running_app(settings(worker_class="app_helpers:BrokenSpawnWorker"),
                     wait_ready=False) as client:
        assert wait_until_status(client, "/healthz", 503)
        assert_error(client.get("/healthz"), 503, "out of memory")
        assert_error(client.get("/readyz"), 503, "no model worker could start")
        image = ("a.png", image_bytes("PNG", (8, 8)), "image/png")
        assert_error(post_files(client, image), 503, "no model worker could start")


def wait_until_status(client, path, status, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(path).status_code == status:
            return True
        time.sleep(0.05)
    return False
