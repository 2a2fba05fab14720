"""The four example workers, each behind ``python -m app`` on a real 127.0.0.1 socket.

Each is served the way a user serves it (``WORKER_CLASS=... make serve``), answers a
request built from nothing but its own ``/openapi.json``, and gives the same answer as its
model called directly on the same checkpoint.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from app_helpers import (
    DETECTOR,
    TINY,
    DetectorReference,
    EmbedderReference,
    Reference,
    TextReference,
    assert_same_top_k,
    image_bytes,
    request_from_openapi,
    save_detector_checkpoint,
    save_embedder_checkpoint,
    save_text_checkpoint,
    served,
    threshold_in_a_gap,
    truncated_jpeg,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit(tmp_path_factory, checkpoint):
    tmp = tmp_path_factory.mktemp("vit")
    with served(tmp, "app.worker:ViTWorker", MODEL_WEIGHTS=str(checkpoint),
                NUM_WORKERS="1") as http:
        yield http, Reference(checkpoint)


def serve_model(tmp_path_factory, worker_class, save, make_reference, weights, **env):
    """Save the worker's tiny checkpoint, serve it, yield (client, reference model)."""
    path = tmp_path_factory.mktemp(weights.split(".")[0]) / weights
    save(path)
    with served(path.parent, worker_class, MODEL_WEIGHTS=str(path), **env) as http:
        yield http, make_reference(path)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    yield from serve_model(tmp_path_factory, "app.examples.embedder:ImageEmbedder",
                           save_embedder_checkpoint, EmbedderReference, "embedder.pth",
                           MODEL_NAME=TINY)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    # A batch window, so the images of one request surely share a forward pass.
    yield from serve_model(tmp_path_factory, "app.examples.detector:ObjectDetector",
                           save_detector_checkpoint, DetectorReference, "detector.pth",
                           MODEL_NAME=DETECTOR, MAX_BATCH_WAIT_MS="200",
                           DETECTOR_MIN_SCORE="0.05")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    yield from serve_model(tmp_path_factory, "app.examples.text:TextClassifier",
                           save_text_checkpoint, TextReference, "text.pth",
                           MODEL_NAME="byte-transformer", MAX_UPLOAD_MB="0.01")


def assert_openapi_request_served(http):
    """A request built from the server's own /openapi.json gets one result per item."""
    spec = http.get("/openapi.json").json()
    kwargs, items = request_from_openapi(spec)
    response = http.post("/predict", **kwargs)
    assert response.status_code == 200, response.text
    answer = response.json()
    schema = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    jsonschema.validate(answer, {**schema, "components": spec["components"]})
    [results] = [value for value in answer.values() if isinstance(value, list)]
    assert len(results) == items >= 2


# One test per worker rather than getfixturevalue: the leak check must see the servers
# started before each test begins.
def test_vit_serves_a_request_built_from_its_openapi_schema(vit):
    assert_openapi_request_served(vit[0])


def test_embedder_serves_a_request_built_from_its_openapi_schema(embedder):
    assert_openapi_request_served(embedder[0])


def test_detector_serves_a_request_built_from_its_openapi_schema(detector):
    assert_openapi_request_served(detector[0])


def test_text_serves_a_request_built_from_its_openapi_schema(text):
    assert_openapi_request_served(text[0])


def test_vit_answers_like_a_direct_timm_forward(vit):
    http, reference = vit
    images = [image_bytes("JPEG", seed=60), image_bytes("PNG", (200, 300), seed=61)]
    response = http.post("/predict", params={"top_k": 4}, files=[
        ("files", (f"{n}.img", data, "image/jpeg")) for n, data in enumerate(images)])
    assert response.status_code == 200, response.text
    for data, prediction in zip(images, response.json()["predictions"], strict=True):
        assert_same_top_k(prediction["top_k"], reference.top_k(data, 4))


def test_embeddings_equal_a_direct_forward_and_have_unit_length(embedder):
    http, reference = embedder
    images = [image_bytes("JPEG", (320, 240), seed=70), image_bytes("PNG", (90, 400), seed=71),
              image_bytes("WEBP", (224, 224), seed=72)]
    response = http.post("/predict", files=[
        ("files", (f"e{n}", data, "application/octet-stream")) for n, data in enumerate(images)])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["dim"] == 192  # vit_tiny's width
    assert [e["filename"] for e in answer["embeddings"]] == ["e0", "e1", "e2"]
    for data, got in zip(images, answer["embeddings"], strict=True):
        expected = reference.embed(data)
        assert abs(sum(v * v for v in got["embedding"]) - 1) < 1e-5
        assert max(abs(g - e) for g, e in zip(got["embedding"], expected, strict=True)) < 1e-5


def test_a_corrupt_image_fails_only_its_request_and_names_the_file(embedder):
    http, _ = embedder
    good = ("good.png", image_bytes("PNG", (32, 32)), "image/png")
    with ThreadPoolExecutor(4) as clients:
        responses = list(clients.map(lambda f: http.post("/predict", files=[("files", f)]), [
            good, ("cut.jpg", truncated_jpeg(), "image/jpeg"), good, good]))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert responses[1].json()["detail"].startswith("file 1 (cut.jpg): cannot decode")


def matches(got: dict, boxes: list, labels: list, scores: list) -> bool:
    return any(got["class_id"] == c and abs(got["score"] - s) < 1e-5
               and max(abs(g - e) for g, e in zip(got["box"], b, strict=True)) < 1e-2
               for b, c, s in zip(boxes, labels, scores, strict=True))


def test_detections_of_different_sized_images_in_one_batch_equal_a_direct_forward(detector):
    http, reference = detector
    images = [image_bytes("JPEG", (320, 240), seed=80), image_bytes("PNG", (500, 375), seed=81),
              image_bytes("JPEG", (128, 300), seed=82)]
    expected = [reference.detect(data) for data in images]
    threshold = threshold_in_a_gap([s for e in expected for s in e["scores"]], top=30)
    before = http.get("/metrics").text
    response = http.post("/predict", params={"min_score": threshold}, files=[
        ("files", (f"d{n}", data, "image/jpeg")) for n, data in enumerate(images)])
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [(p["width"], p["height"]) for p in predictions] == [(320, 240), (500, 375),
                                                               (128, 300)]
    total = 0
    for prediction, e in zip(predictions, expected, strict=True):
        keep = [i for i, s in enumerate(e["scores"]) if s >= threshold]
        boxes, labels, scores = ([e[k][i] for i in keep] for k in ("boxes", "labels", "scores"))
        found = prediction["detections"]
        assert len(found) == len(keep)
        assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
        for d in found:
            assert matches(d, boxes, labels, scores), d
            assert d["label"] and 0 <= d["box"][0] <= d["box"][2] <= prediction["width"]
        total += len(found)
    assert total >= 1, "no detection over the threshold: the comparison would be empty"
    batches = (metric(http.get("/metrics").text, "pool_batch_size_count")
               - metric(before, "pool_batch_size_count"))
    assert batches < 3, "the three images never shared a batch"


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_detector_refusals(detector):
    http, _ = detector
    image = ("a.png", image_bytes("PNG", (16, 16)), "image/png")
    out_of_range = http.post("/predict", params={"min_score": 1.5}, files=[("files", image)])
    assert out_of_range.status_code == 422 and "min_score" in out_of_range.text
    not_an_image = http.post("/predict", files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert not_an_image.status_code == 415
    corrupt = http.post("/predict", files=[("files", ("t.jpg", truncated_jpeg(), "image/jpeg"))])
    assert corrupt.status_code == 400 and "t.jpg" in corrupt.json()["detail"]
    assert http.post("/predict", files=[("files", image)]).status_code == 200


def test_detector_settings_reach_the_worker_and_show_in_model_info(detector):
    http, _ = detector
    info = http.get("/v1/model").json()
    assert info["model"] == DETECTOR
    assert info["worker_settings"] == {"min_score": 0.05, "max_detections": 100}
    [worker] = info["workers"]
    assert worker["weights"] == "checkpoint" and worker["num_classes"] == 91
    # DETECTOR_MIN_SCORE=0.05 is the default threshold when the request gives none.
    response = http.post("/predict", files=[("files", ("a.jpg", image_bytes(seed=81),
                                                       "image/jpeg"))])
    scores = [d["score"] for d in response.json()["predictions"][0]["detections"]]
    assert scores and min(scores) >= 0.05


TEXTS = ["great value, would buy again", "broke after a day", "ok",
         "Überraschend gut — 很好 👍", "x" * 700]


def test_text_answers_equal_a_direct_forward(text):
    http, reference = text
    response = http.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(TEXTS)
    for sample, got in zip(TEXTS, predictions, strict=True):
        expected = reference.classify(sample)
        assert got["label"] == expected["label"] and got["class_id"] == expected["class_id"]
        assert abs(got["probability"] - expected["probability"]) < 1e-5
    assert {p["label"] for p in predictions} <= {"negative", "positive"}


@pytest.mark.parametrize("kwargs, status, words", [
    ({"json": {"texts": []}}, 422, ["texts"]),
    ({"json": {"texts": "one string"}}, 422, ["texts"]),
    ({"json": {"texts": ["fine", ""]}}, 422, ["texts"]),
    ({"json": {"text": ["wrong field"]}}, 422, ["texts"]),
    ({"content": b'{"texts": [', "headers": {"content-type": "application/json"}}, 422,
     ["json"]),
    ({"files": [("texts", ("a.txt", b"hello", "text/plain"))]}, 422, []),
    # JSON's NaN and Infinity parse; the 422 that echoes them must still be JSON.
    ({"content": b'{"texts": [NaN, Infinity]}', "headers": {"content-type": "application/json"}},
     422, ["texts"]),
    ({"content": b'{"texts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}},
     400, ["UTF-8"]),
    ({"json": {"texts": ["y" * 20_000]}}, 413, ["MAX_UPLOAD_MB"]),
])
def test_text_refusals_are_clear_and_the_server_goes_on(text, kwargs, status, words):
    http, _ = text
    response = http.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.text.lower() or word in response.text
    assert "Traceback" not in response.text
    assert http.post("/predict", json={"texts": ["still here"]}).status_code == 200
