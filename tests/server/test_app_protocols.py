"""The protocols around one serving core, seen from a client: KServe v2 gets the deadline,
the limits and the error shape of ``/predict`` (in its own ``{"error"}``), whoever refuses
the request; a nested JSON bomb is a client error; a model whose name holds a slash is
reachable under its served name."""

from __future__ import annotations

import base64
import logging
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from app_helpers import (
    ROOT,
    http_client,
    image_bytes,
    running_app,
    serve,
    settings,
    wait_ready,
    wait_until,
)
from pydantic import ValidationError

from app.serving.plan import served_name_for
from app.settings import Settings

ECHO = "app.examples.echo_worker:EchoWorker"
LIMIT_MB = 1


def v2_request(*images: bytes, **parameters: Any) -> dict[str, Any]:
    """A KServe v2 inference request with the images as a JSON (base64) tensor."""
    body: dict[str, Any] = {"inputs": [{
        "name": "files", "datatype": "BYTES", "shape": [len(images)],
        "data": [base64.b64encode(image).decode() for image in images]}]}
    if parameters:
        body["parameters"] = parameters
    return body


def assert_v2_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    for word in words:
        assert word in body["error"], body


@pytest.fixture(scope="module")
def echo():
    """The echo worker served from a hub-style name, with a 1 MiB body limit."""
    with running_app(settings(worker_class=ECHO, model_name="org/echo-model",
                              max_upload_mb=LIMIT_MB, max_files=3)) as client:
        yield client


# ---- the deadline ----------------------------------------------------------------------------

def test_v2_honours_the_deadline_header_and_the_timeout_parameter():
    # One worker, 0.5 s per image, a server limit far away: only the client's limit can
    # make a 504.
    with running_app(settings(worker_class="app_helpers:SlowEchoWorker",
                              model_name="echo", max_batch_size=1)) as client:
        url = "/v2/models/echo/infer"
        image = image_bytes("PNG", (8, 8))
        response = client.post(url, json=v2_request(image),
                               headers={"X-Request-Timeout": "0.2"})
        assert_v2_error(response, 504, "0.2 s (X-Request-Timeout)")
        # The protocol's own way: Triton's timeout parameter, in microseconds.
        assert_v2_error(client.post(url, json=v2_request(image, timeout=200_000)), 504,
                        "0.2 s (the 'timeout' parameter)")
        # The shorter of the two wins; 0 is no limit of the client's.
        assert_v2_error(client.post(url, json=v2_request(image, timeout=30_000_000),
                                    headers={"X-Request-Timeout": "0.2"}), 504,
                        "X-Request-Timeout")
        for ok in ({"json": v2_request(image), "headers": {"X-Request-Timeout": "30"}},
                   {"json": v2_request(image, timeout=0)},
                   {"json": v2_request(image, timeout=30_000_000)}):
            assert client.post(url, **ok).status_code == 200, ok
        # A bad limit is a protocol error, in the protocol's shape.
        assert_v2_error(client.post(url, json=v2_request(image),
                                    headers={"X-Request-Timeout": "soon"}),
                        400, "X-Request-Timeout")
        for bad in (-1, 1.5, "100", True):
            assert_v2_error(client.post(url, json=v2_request(image, timeout=bad)), 400,
                            "'timeout'")
        assert 'http_requests_expired_total 3.0' in client.get("/metrics").text


# ---- the error shape of every refusal --------------------------------------------------------

def test_v2_answers_the_middlewares_refusals_in_its_own_shape(echo):
    url = "/v2/models/echo-model/infer"
    too_big = b"{" + b" " * (LIMIT_MB * 2**20) + b"}"
    assert_v2_error(echo.post(url, content=too_big), 413, "MAX_UPLOAD_MB")

    def chunks():  # a generator body goes out chunked, without Content-Length
        for start in range(0, len(too_big), 64 * 1024):
            yield too_big[start:start + 64 * 1024]

    chunked = echo.post(url, content=chunks())
    assert "content-length" not in chunked.request.headers
    assert_v2_error(chunked, 413, "MAX_UPLOAD_MB")
    assert_v2_error(echo.post(url, content=b"{}", headers={"content-length": "two"}), 400,
                    "Content-Length")
    assert_v2_error(echo.get("/v2/no/such/route"), 404)
    assert_v2_error(echo.get(url), 405)
    # The same refusals on /predict keep FastAPI's shape.
    predict = echo.post("/predict", content=too_big)
    assert predict.status_code == 413 and "MAX_UPLOAD_MB" in predict.json()["detail"]
    assert echo.get("/no/such/route").json() == {"detail": "Not Found"}
    # And the server goes on.
    assert echo.post(url, json=v2_request(image_bytes("PNG", (8, 8)))).status_code == 200


def test_v2_answers_load_shedding_in_its_own_shape():
    with running_app(settings(worker_class="app_helpers:SlowerEchoWorker", model_name="echo",
                              queue_size=1, max_batch_size=1)) as client, \
            ThreadPoolExecutor(2) as threads:
        url = "/v2/models/echo/infer"

        def post(seed: int) -> httpx.Response:
            return client.post(url, json=v2_request(image_bytes("PNG", (8, 8), seed)))

        def metric(name: str) -> float:
            line = next(line for line in client.get("/metrics").text.splitlines()
                        if line.startswith(name + " "))
            return float(line.split()[1])

        running = threads.submit(post, 1)  # 2 s on the worker
        assert wait_until(lambda: metric("pool_busy_workers") == 1, timeout=10)
        queued = threads.submit(post, 2)  # fills the queue (QUEUE_SIZE=1)
        assert wait_until(lambda: metric("pool_queue_depth") == 1, timeout=10)
        assert_v2_error(post(3), 503, "queue full")  # refused by the pool
        refused = client.post(url, content=b"not even JSON")  # refused before its body
        assert_v2_error(refused, 503, "queue full")
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert running.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200


@pytest.mark.slow
def test_v2_answers_a_request_cut_by_shutdown_in_its_own_shape(tmp_path):
    with serve(tmp_path, WORKER_CLASS="app_helpers:WidthDelayEchoWorker", MODEL_NAME="echo",
               NUM_WORKERS="1", SHUTDOWN_TIMEOUT_S="0.5") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        with ThreadPoolExecutor(1) as threads:
            def long_request() -> httpx.Response:  # 3 s on the worker
                with http_client(url) as own:
                    return own.post("/v2/models/echo/infer",
                                    json=v2_request(image_bytes("PNG", (300, 8))))

            pending = threads.submit(long_request)
            assert wait_until(lambda: "pool_busy_workers 1.0" in http.get("/metrics").text,
                              timeout=10)
            process.send_signal(signal.SIGTERM)
            assert_v2_error(pending.result(timeout=30), 503, "shutting down")
        assert process.wait(timeout=30) == 0, log.read_text()


# ---- a nested JSON bomb ----------------------------------------------------------------------

@pytest.mark.parametrize(("depth", "v2_status", "predict_status"), [
    (500, 200, 422),  # parsed: v2 flattens nested data; /predict's list[str] refuses it
    (5000, 400, 400),  # too deep to parse
])
def test_deeply_nested_json_is_never_a_500(depth, v2_status, predict_status):
    nested = "[" * depth + '"x"' + "]" * depth
    with running_app(settings(worker_class="app_helpers:LengthOneByOne",
                              model_name="lengths")) as client:
        v2 = client.post("/v2/models/lengths/infer", content=(
            '{"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": '
            f"{nested}}}]}}"))
        if v2_status == 200:
            assert v2.status_code == 200, v2.text
        else:
            assert_v2_error(v2, v2_status, "nested too deeply")
        predict = client.post("/predict", content=f'{{"texts": {nested}}}',
                              headers={"content-type": "application/json"})
        assert predict.status_code == predict_status, predict.text
        assert "detail" in predict.json()
        assert client.post("/predict", json={"texts": ["abc"]}).json() == [3]


# ---- served names ----------------------------------------------------------------------------

def test_a_model_whose_name_has_a_slash_is_reachable_under_its_served_name(echo):
    meta = echo.get("/v2/models/echo-model")
    assert meta.status_code == 200, meta.text
    assert meta.json()["name"] == "echo-model"
    assert echo.get("/v2/models/echo-model/ready").json() == {"name": "echo-model",
                                                              "ready": True}
    answer = echo.post("/v2/models/echo-model/infer", json=v2_request(image_bytes("PNG")))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_name"] == "echo-model"
    info = echo.get("/v1/model").json()
    assert (info["model"], info["served_model_name"]) == ("org/echo-model", "echo-model")
    assert_v2_error(echo.get("/v2/models/org"), 404, "unknown model 'org'", "'echo-model'")


def test_served_model_name_names_the_model_for_clients():
    with running_app(settings(worker_class=ECHO, model_name="/models/echo/",
                              served_model_name="echo-v2")) as client:
        assert client.get("/v2/models/echo-v2").json()["name"] == "echo-v2"
        assert_v2_error(client.get("/v2/models/echo"), 404, "'echo-v2'")
    assert [served_name_for(n) for n in ("org/name", "/models/bert/", "hf-hub:org/x", "vit")
            ] == ["name", "bert", "x", "vit"]
    with pytest.raises(ValidationError, match="served_model_name"):
        Settings(served_model_name="org/name")


# ---- the core's seams ------------------------------------------------------------------------

def test_the_serving_core_imports_no_web_framework():
    code = ("import sys, app.serving.core; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_worker_ready_line_names_only_what_spawn_returned(caplog):
    caplog.set_level(logging.INFO, logger="app")
    with running_app(settings(worker_class="app_helpers:PairWorker", model_name="pair")):
        pass
    [line] = [r.getMessage() for r in caplog.records if "ready" in r.getMessage()
              and r.name == "app"]
    assert line == "worker 0 ready"
