"""POST /predict end to end: the real lifespan, two worker processes, a tiny ViT checkpoint."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from app_helpers import (
    Reference,
    assert_same_top_k,
    image_bytes,
    running_app,
    settings,
    truncated_jpeg,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Reference(checkpoint)


@pytest.fixture(scope="module")
def client(checkpoint):
    with running_app(settings(model_weights=str(checkpoint), num_workers=2,
                              max_batch_size=8)) as client:
        yield client


def predict(client, *images, top_k=None, headers=None):
    files = [("files", (f"img{n}.{fmt.lower()}", data, f"image/{fmt.lower()}"))
             for n, (fmt, data) in enumerate(images)]
    params = {} if top_k is None else {"top_k": top_k}
    return client.post("/predict", files=files, params=params, headers=headers)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_prediction_equals_direct_timm_forward(client, reference):
    data = image_bytes("JPEG", seed=1)
    response = predict(client, ("JPEG", data))
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert prediction["filename"] == "img0.jpeg"
    assert len(prediction["top_k"]) == 5
    assert_same_top_k(prediction["top_k"], reference.top_k(data, 5))


def test_several_files_answered_in_order_for_every_format(client, reference):
    images = [(fmt, image_bytes(fmt, size=(200 + 40 * n, 180), seed=n))
              for n, fmt in enumerate(["PNG", "JPEG", "WEBP", "BMP", "GIF"])]
    response = predict(client, *images, top_k=3)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [
        "img0.png", "img1.jpeg", "img2.webp", "img3.bmp", "img4.gif"]
    for (_, data), prediction in zip(images, predictions, strict=True):
        assert_same_top_k(prediction["top_k"], reference.top_k(data, 3))


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(client, reference):
    images = [image_bytes("JPEG", seed=10 + n) for n in range(24)]
    before = client.get("/metrics").text
    with ThreadPoolExecutor(12) as clients:
        responses = list(clients.map(lambda d: predict(client, ("JPEG", d), top_k=2), images))
    assert [r.status_code for r in responses] == [200] * 24
    for data, response in zip(images, responses, strict=True):
        assert_same_top_k(response.json()["predictions"][0]["top_k"], reference.top_k(data, 2))
    after = client.get("/metrics").text
    batches = (metric(after, "pool_batch_size_count")
               - metric(before, "pool_batch_size_count"))
    single = (metric(after, "pool_batch_size_bucket", le="1.0")
              - metric(before, "pool_batch_size_bucket", le="1.0"))
    # 12 clients on 2 workers: while a worker runs a batch the others queue up behind it.
    assert batches < 24, "every request ran alone: nothing was batched"
    assert single < batches, "no batch held more than one image"


def test_corrupt_image_fails_only_its_own_request(client, reference):
    good = [image_bytes("JPEG", seed=30 + n) for n in range(11)]
    uploads = [("JPEG", d) for d in good]
    uploads.insert(5, ("JPEG", truncated_jpeg()))
    with ThreadPoolExecutor(12) as clients:
        responses = list(clients.map(lambda u: predict(client, u), uploads))
    bad = responses.pop(5)
    assert bad.status_code == 400
    assert bad.json()["detail"].startswith("file 1 (img0.jpeg): cannot decode")
    for data, response in zip(good, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same_top_k(response.json()["predictions"][0]["top_k"], reference.top_k(data))


def test_a_bad_file_fails_the_whole_multi_file_request(client):
    response = predict(client, ("JPEG", image_bytes()), ("JPEG", truncated_jpeg()))
    assert response.status_code == 400
    assert "file 2" in response.json()["detail"]


def test_model_info_shows_checkpoint_weights_and_device_per_worker(client, checkpoint):
    info = client.get("/v1/model").json()
    assert info["model"] == "vit_tiny_patch16_224"
    assert info["weights"] == str(checkpoint)
    assert info["batching"] == {"max_batch_size": 8, "max_batch_wait_ms": 0.0}
    assert [w["worker_id"] for w in info["workers"]] == [0, 1]
    for worker in info["workers"]:
        assert worker["weights"] == "checkpoint"
        assert worker["weights_source"] == str(checkpoint)
        assert worker["device"] == "cpu"
        assert worker["num_threads"] >= 1
        assert worker["state"] in ("idle", "busy")


def test_probes_answer_and_every_response_carries_a_request_id(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "workers_ready": 2, "workers": 2,
                            "weights": "checkpoint", "random_weights": False}
    assert re.fullmatch(r"[0-9a-f]{32}", health.headers["x-request-id"])
    echoed = client.get("/healthz", headers={"X-Request-ID": "client-id-42"})
    assert echoed.headers["x-request-id"] == "client-id-42"
    # An id that could forge log lines or headers is replaced, not echoed.
    forged = client.get("/healthz", headers={"X-Request-ID": "a b\tc"})
    assert forged.headers["x-request-id"] != "a b\tc"
    missing = client.post("/predict")
    assert missing.status_code == 422 and "x-request-id" in missing.headers


def test_metrics_expose_requests_latency_and_pool(client):
    predict(client, ("JPEG", image_bytes()))
    client.get("/nope")
    text = client.get("/metrics").text
    assert metric(text, "http_requests_total", method="POST", route="/predict",
                  status="200") >= 1
    assert metric(text, "http_requests_total", method="GET", route="other", status="404") == 1
    assert metric(text, "http_request_duration_seconds_count", method="POST",
                  route="/predict") >= 1
    for name in ("pool_queue_depth", "pool_in_flight", "pool_busy_workers",
                 "pool_worker_restarts_total"):
        assert re.search(rf"^{name} ", text, re.MULTILINE), name
    assert metric(text, "pool_workers", state="idle") + metric(
        text, "pool_workers", state="busy") == 2
    assert metric(text, "pool_tasks_total", outcome="completed") >= 1


def test_openapi_documents_predict_with_the_worker_output(client):
    spec = client.get("/openapi.json").json()
    predict_op = spec["paths"]["/predict"]["post"]
    assert {"400", "413", "415", "503", "504"} <= set(predict_op["responses"])
    schemas = spec["components"]["schemas"]
    assert "top_k" in schemas["ClassificationPrediction"]["properties"]
    assert client.get("/docs").status_code == 200
