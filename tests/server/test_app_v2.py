"""The Open Inference Protocol (KServe v2) with NVIDIA's ``tritonclient.http``, a client we did
not write, against the real server on a 127.0.0.1 socket."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import tritonclient.http as triton
from app_helpers import TINY, image_bytes, served, truncated_jpeg
from tritonclient.utils import InferenceServerException

TEXT = "byte-transformer"


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    with served(tmp_path_factory.mktemp("v2"), "app.worker:ViTWorker",
                MODEL_WEIGHTS="random") as http:
        yield http, triton.InferenceServerClient(http.base_url.netloc.decode())


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    with served(tmp_path_factory.mktemp("v2text"), "app.examples.text:TextClassifier",
                MODEL_NAME=TEXT,
                MODEL_WEIGHTS="random") as http:
        yield http, triton.InferenceServerClient(http.base_url.netloc.decode())


def images_input(images: list[bytes], *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("files", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object))
    else:  # a JSON tensor carries images as base64 strings
        tensor.set_data_from_numpy(
            np.array([base64.b64encode(i).decode() for i in images], dtype=object),
            binary_data=False)
    return tensor


def predict(http, images: list[bytes], top_k: int) -> list[list[dict]]:
    response = http.post("/predict", params={"top_k": top_k},
                         files=[("files", (f"{n}.img", data)) for n, data in enumerate(images)])
    assert response.status_code == 200, response.text
    return [p["top_k"] for p in response.json()["predictions"]]


def test_health_and_metadata_describe_the_served_model(vit):
    _, client = vit
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data",
                                                          "model_repository"]
    assert client.is_model_ready(TINY)
    meta = client.get_model_metadata(TINY)
    assert meta["name"] == TINY
    assert meta["inputs"] == [{"name": "files", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {"filename": ("BYTES", [-1]), "top_k.class_id": ("INT64", [-1, -1]),
                       "top_k.label": ("BYTES", [-1, -1]),
                       "top_k.probability": ("FP32", [-1, -1])}
    # The server runs on random weights, and the metadata says so.
    assert meta["parameters"] == {"weights": "random", "random_weights": True}
    assert not client.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_images_gives_the_predict_answer(vit, binary):
    http, client = vit
    images = [image_bytes(seed=1), image_bytes("PNG", (100, 80), seed=2),
              image_bytes("WEBP", seed=3)]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary)
               for name in ("top_k.class_id", "top_k.label", "top_k.probability")]
    result = client.infer(TINY, [images_input(images, binary=binary)], outputs=outputs,
                          parameters={"top_k": 4}, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7"
    assert all(("data" in o) is not binary for o in response["outputs"])
    class_ids = result.as_numpy("top_k.class_id")
    labels = result.as_numpy("top_k.label")
    probabilities = result.as_numpy("top_k.probability")
    assert class_ids.shape == labels.shape == probabilities.shape == (3, 4)
    expected = predict(http, images, top_k=4)
    for row, want in enumerate(expected):
        assert class_ids[row].tolist() == [w["class_id"] for w in want]
        got_labels = [x.decode() if isinstance(x, bytes) else x for x in labels[row]]
        assert got_labels == [w["label"] for w in want]
        np.testing.assert_allclose(probabilities[row], [w["probability"] for w in want],
                                   rtol=1e-5)


def test_infer_all_outputs_binary_by_default(vit):
    _, client = vit
    result = client.infer(TINY, [images_input([image_bytes(seed=4)])])
    assert result.as_numpy("filename").tolist() == [b""]  # a tensor has no file name
    assert result.as_numpy("top_k.class_id").shape == (1, 5)  # top_k's default


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return f"{info.value.status()} {info.value.message()}"


def test_protocol_errors_are_clear_and_the_server_keeps_serving(vit):
    http, client = vit
    good = image_bytes(seed=5)
    assert status_of(lambda: client.infer("resnet", [images_input([good])])).startswith(
        "404 unknown model 'resnet'")
    assert status_of(lambda: client.infer(TINY, [images_input([good, truncated_jpeg()])])
                     ).startswith("400 files[1]: cannot decode the image")
    assert status_of(lambda: client.infer(TINY, [images_input([b"plain text"])])
                     ).startswith("415 files[0]: not an image")
    assert status_of(lambda: client.infer(TINY, [images_input([good])],
                                          parameters={"top_k": 0})
                     ).startswith("400 invalid inference request: top_k")
    wrong = triton.InferInput("pixels", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, np.float32))
    assert status_of(lambda: client.infer(TINY, [wrong])).startswith(
        "400 unknown input 'pixels'")
    # Raw bodies a client library would never send.
    url = f"/v2/models/{TINY}/infer"
    for body, headers, expected in [
        (b"{not json", {}, "not valid JSON"),
        (b'{"inputs": [{"name": "files", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}',
         {}, "shape [2] holds 2 elements, got 1"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "does not fit"),
    ]:
        response = http.post(url, content=body, headers=headers)
        assert response.status_code == 400 and expected in response.json()["error"], (
            response.text)
    assert client.infer(TINY, [images_input([good])]).as_numpy("top_k.class_id").shape == (1, 5)


def test_v2_requests_share_the_metrics(vit):
    http, client = vit
    client.infer(TINY, [images_input([image_bytes(seed=6)])])
    metrics = http.get("/metrics").text
    assert ('http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}'
            in metrics)
    # The pool's own histograms: queue wait, and run time per worker.
    count = re.search(r"^pool_queue_wait_seconds_count (\S+)$", metrics, re.M)
    assert count and float(count[1]) >= 1
    runs = re.search(r'^pool_task_run_seconds_bucket\{le="\+Inf",worker_id="0"\} (\S+)$',
                     metrics, re.M)
    assert runs and float(runs[1]) >= 1
    assert 'model_random_weights{worker_id="0"} 1.0' in metrics


def test_text_worker_takes_json_and_binary_bytes_tensors(text):
    http, client = text
    meta = client.get_model_metadata(TEXT)
    assert meta["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "BYTES", "class_id": "INT64", "probability": "FP32"}
    texts = ["great value", "broke in a day, é 中"]
    expected = http.post("/predict", json={"texts": texts}).json()["predictions"]
    for binary in (True, False):
        tensor = triton.InferInput("texts", [2], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary)
                   for n in ("label", "class_id", "probability")]
        result = client.infer(TEXT, [tensor], outputs=outputs)
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        assert labels == [e["label"] for e in expected]
        assert result.as_numpy("class_id").tolist() == [e["class_id"] for e in expected]
        np.testing.assert_allclose(result.as_numpy("probability"),
                                   [e["probability"] for e in expected], rtol=1e-5)
    empty = triton.InferInput("texts", [0], "BYTES")
    empty.set_data_from_numpy(np.array([], dtype=object))
    assert status_of(lambda: client.infer(TEXT, [empty])).startswith(
        "400 invalid inference request: texts")
