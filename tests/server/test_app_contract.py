"""The worker contract read by the server: declarations, worker settings, MODEL_WEIGHTS,
and the skeleton of docs/SERVE_YOUR_MODEL.md served as written."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from app_helpers import ROOT, TINY, image_bytes, running_app, settings, truncated_jpeg, wait_until
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ValidationError

from app.contract import ImageFile, ModelWorker
from app.main import create_app
from app.protocols.predict import add_inference_route
from app.serving.declaration import declaration_of
from app.settings import Settings

TEXT = "app.examples.text:TextClassifier"


class Texts(BaseModel):
    texts: list[str]


class NoHooks(ModelWorker):
    pass


class Unannotated(ModelWorker):
    @classmethod
    def to_items(cls, request):  # type: ignore[no-untyped-def]
        return [request]

    @classmethod
    def to_answer(cls, request: Texts, results: list[str]) -> list[str]:
        return results


class UploadAndModel(BaseModel):
    files: list[ImageFile]
    options: Texts  # cannot be a query parameter


class UploadWithNestedModel(ModelWorker):
    @classmethod
    def to_items(cls, request: UploadAndModel) -> list[ImageFile]:
        return request.files

    @classmethod
    def to_answer(cls, request: UploadAndModel, results: list[str]) -> list[str]:
        return results


class UndefinedName(ModelWorker):
    @classmethod
    def to_items(cls, request: NotDefinedAnywhere) -> list[str]:  # type: ignore[name-defined]  # noqa: F821
        return []

    @classmethod
    def to_answer(cls, request: Texts, results: list[str]) -> list[str]:
        return results


class Undocumented(ModelWorker):
    @classmethod
    def to_items(cls, request: Texts) -> list[str]:
        return request.texts

    @classmethod
    def to_answer(cls, request: Texts, results: list[str]) -> list[str]:
        return results

    def execute_batch(self, items: list[str]) -> list[str]:
        return items


class Documented(Undocumented):
    """Echoes texts."""


def test_openapi_describes_predict_with_the_workers_own_docstring_only():
    def description(worker_cls: type[ModelWorker]) -> str:
        app = FastAPI()
        add_inference_route(app.router, declaration_of(worker_cls))
        return str(app.openapi()["paths"]["/predict"]["post"].get("description", ""))

    assert description(Documented) == "Echoes texts."
    assert description(Undocumented) == ""  # not ModelWorker's docstring for developers


class NoExecute(Undocumented):
    execute_batch = ModelWorker.execute_batch  # and no execute either


def test_a_worker_that_defines_execute_but_not_execute_batch_is_served_item_by_item():
    with running_app(settings(worker_class="app_helpers:LengthOneByOne")) as client:
        answer = client.post("/predict", json={"texts": ["abc", "de"]})
        assert answer.status_code == 200, answer.text
        assert answer.json() == [3, 2]
        refused = client.post("/predict", json={"texts": ["abc", ""]})
        assert refused.status_code == 400, refused.text
        assert "item 2: an empty text" in refused.text


def test_a_worker_declaring_its_types_wrongly_is_refused_at_startup():
    with pytest.raises(ValueError, match=r"must define execute_batch\(\) or execute\(\)"):
        declaration_of(NoExecute)
    with pytest.raises(ValueError, match="must define the class method to_items"):
        declaration_of(NoHooks)
    with pytest.raises(ValueError, match="must annotate its request parameter"):
        declaration_of(Unannotated)
    with pytest.raises(ValueError, match="cannot resolve an annotation"):
        declaration_of(UndefinedName)
    with pytest.raises(ValueError, match="'options' of an upload request must be a plain"):
        declaration_of(UploadWithNestedModel)


def test_uploads_become_file_fields_and_the_rest_query_parameters():
    from app.worker import ViTWorker

    declaration = declaration_of(ViTWorker)
    assert declaration.uploads == {"files": True}
    assert declaration.query_model is not None
    assert list(declaration.query_model.model_fields) == ["top_k"]
    text = declaration_of(create_app(settings(worker_class=TEXT)).state.server.worker_cls)
    assert text.uploads == {} and text.query_model is None


def test_an_upload_request_with_an_alias_a_validator_and_a_field_named_request():
    with running_app(settings(worker_class="app_helpers:PairWorker")) as client:
        def post(*widths: int, query: str = "") -> Any:
            files = [(name, (f"{name}.png", image_bytes("PNG", (width, 8)), "image/png"))
                     for name, width in zip(("request", "second"), widths, strict=False)]
            return client.post(f"/predict{query}", files=files)

        answer = post(16, 16, query="?minSide=3")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"widths": [16, 16], "min_side": 3}  # the alias reached it
        refused = post(16, 24)
        assert refused.status_code == 422, refused.text
        assert "both images must have the same width" in refused.text
        assert len(refused.content) < 1000  # the images are not echoed back
        assert post(24).json() == {"widths": [24], "min_side": 1}
        # Two files for a one-file field: refused, not one of them silently dropped.
        two = [("second", (f"{n}.png", image_bytes("PNG", (16, 8)), "image/png"))
               for n in range(2)]
        doubled = client.post("/predict", files=[
            ("request", ("r.png", image_bytes("PNG", (16, 8)), "image/png")), *two])
        assert doubled.status_code == 422, doubled.text
        assert "second" in doubled.text and "one file" in doubled.text
        # A query parameter sent as a form field: pointed to the query, not silently ignored.
        misplaced = client.post("/predict", data={"minSide": "3"}, files=[
            ("request", ("r.png", image_bytes("PNG", (16, 8)), "image/png"))])
        assert misplaced.status_code == 422, misplaced.text
        assert "?minSide=" in misplaced.text
        # The Open Inference Protocol: the upload named "request" is an input like any other,
        # and the parameter is taken under its name or its alias.
        image = base64.b64encode(image_bytes("PNG", (16, 8))).decode()
        for parameter in ("min_side", "minSide"):
            infer = client.post(f"/v2/models/{TINY}/infer", json={
                "inputs": [{"name": "request", "datatype": "BYTES", "shape": [1],
                            "data": [image]}], "parameters": {parameter: 3}})
            assert infer.status_code == 200, infer.text
            [output] = infer.json()["outputs"]
            assert json.loads(output["data"][0]) == {"widths": [16], "min_side": 3}


def test_invalid_worker_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("DETECTOR_MIN_SCORE", "5")
    with pytest.raises(ValueError, match=r"DETECTOR_\*[\s\S]*min_score"):
        create_app(settings(worker_class="app.examples.detector:ObjectDetector"))
    monkeypatch.setenv("TEXT_LABELS", "only-one")
    with pytest.raises(ValueError, match="at least two names"):
        create_app(settings(worker_class=TEXT))


def test_model_weights_accepts_hub_ids_and_refuses_other_strings():
    assert Settings(model_weights="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
                    ).model_weights.startswith("hf-hub:")
    for bad in ("hf-hub:no-slash", "https://example.org/w.pth", "/nowhere/w.safetensors"):
        with pytest.raises(ValidationError, match="hf-hub:org/name"):
            Settings(model_weights=bad)


def test_hub_weights_that_cannot_be_fetched_stop_the_workers_with_the_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by the worker processes at spawn
    with running_app(settings(worker_class=TEXT, model_name="byte-transformer",
                              model_weights="hf-hub:example/byte-transformer"),
                     wait_ready=False) as client:
        assert wait_until(lambda: client.get("/healthz").status_code == 503, timeout=60)
        detail = client.get("/readyz").json()["detail"]
        assert "no model worker could start" in detail
        assert "hf-hub:example/byte-transformer" in detail, detail


def test_text_worker_without_published_weights_falls_back_to_random_with_auto(caplog):
    with running_app(settings(worker_class=TEXT, model_name="byte-transformer",
                              model_weights="auto")) as client:
        [worker] = client.get("/v1/model").json()["workers"]
        assert worker["weights"] == "random"
        assert "no published pretrained weights" in worker["weights_source"] or \
            "pretrained weights unavailable" in worker["weights_source"]
        response = client.post("/predict", json={"texts": ["hello"]})
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"] in ("negative", "positive")


def skeleton_from_the_docs() -> str:
    text = (ROOT / "docs" / "SERVE_YOUR_MODEL.md").read_text()
    section = text.split("## A skeleton", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_skeleton_of_the_docs_serves_as_written(tmp_path, monkeypatch):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "colors.py").write_text(skeleton_from_the_docs())
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    monkeypatch.setenv("COLORS_SCALE", "255")
    with running_app(settings(worker_class="mymodels.colors:MeanColor")) as client:
        pink = io.BytesIO()
        Image.new("RGB", (8, 8), (255, 0, 128)).save(pink, format="PNG")
        response = client.post("/predict", params={"decimals": 1}, files=[
            ("files", ("pink.png", pink.getvalue(), "image/png")),
            ("files", ("noise.jpg", image_bytes(), "image/jpeg"))])
        assert response.status_code == 200, response.text
        means = response.json()["means"]
        assert means[0] == [255.0, 0.0, 128.0] and len(means) == 2
        assert client.get("/v1/model").json()["worker_settings"] == {"scale": 255.0}
        corrupt = client.post("/predict", files=[("files", ("t.jpg", truncated_jpeg(),
                                                            "image/jpeg"))])
        assert corrupt.status_code == 400 and "t.jpg" in corrupt.json()["detail"]
        spec = client.get("/openapi.json").json()
        assert "ColorAnswer" in spec["components"]["schemas"]
