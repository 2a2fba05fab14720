"""Object detection: uploaded images -> boxes, labels and scores per image (torchvision).

One file, served with::

    WORKER_CLASS=app.examples.detector:ObjectDetector make serve
    curl -F files=@street.jpg 'http://127.0.0.1:8000/predict?min_score=0.4'

``MODEL_NAME`` is a torchvision detection model (default ``ssdlite320_mobilenet_v3_large``;
also ``fasterrcnn_mobilenet_v3_large_320_fpn``, ``retinanet_resnet50_fpn``...) with the 91
COCO categories. ``MODEL_WEIGHTS``: ``auto`` / ``pretrained`` download torchvision's COCO
weights (``auto`` falls back to random init offline, with a WARNING), ``random``, a
state-dict file, or ``hf-hub:org/name`` (a repository holding ``model.safetensors``).

Images of any size go into one batch: torchvision detection models take a list of tensors
and resize each internally; boxes come back in the pixels of the uploaded image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contract import ImageFile, ModelWorker, WorkerConfig
from app.runtime import TorchRuntime
from app.weights import load_weights


class DetectorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DETECTOR_")

    min_score: float = Field(0.5, ge=0, le=1, description="default lowest score returned")
    max_detections: int = Field(100, ge=1, description="most boxes returned per image")


class DetectRequest(BaseModel):
    files: list[ImageFile] = Field(description="one or more images")
    min_score: float | None = Field(
        None, ge=0, le=1, description="drop boxes scoring lower (default DETECTOR_MIN_SCORE)")


class Detection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the uploaded image",
                             min_length=4, max_length=4)
    class_id: int = Field(description="COCO category index")
    label: str
    score: float = Field(ge=0, le=1)


class ImageDetections(BaseModel):
    filename: str | None = Field(description="the upload's filename, if it had one")
    width: int
    height: int
    detections: list[Detection] = Field(description="highest score first")


class Detections(BaseModel):
    predictions: list[ImageDetections] = Field(description="one per uploaded file, in order")


@dataclass(frozen=True)
class DetectItem:
    """One image and the request's score threshold: the pool item."""

    data: bytes
    min_score: float | None


class ObjectDetector(ModelWorker):
    """A torchvision detector: boxes, labels and scores for each uploaded image."""

    default_model = "ssdlite320_mobilenet_v3_large"
    settings_model = DetectorSettings

    @classmethod
    def to_items(cls, request: DetectRequest) -> list[DetectItem]:
        return [DetectItem(f.data, request.min_score) for f in request.files]

    @classmethod
    def to_answer(cls, request: DetectRequest,
                  results: list[list[dict[str, Any]]]) -> Detections:
        return Detections(predictions=[
            ImageDetections(filename=f.filename, width=f.width, height=f.height, detections=r)
            for f, r in zip(request.files, results, strict=True)])

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        import torch
        from torchvision.models import get_model, get_model_weights

        started = time.monotonic()
        self.settings: DetectorSettings = config.options
        self.runtime = TorchRuntime(config)
        name = config.model_name
        self.labels = list(get_model_weights(name).DEFAULT.meta["categories"])
        model, weights, source = load_weights(
            name, config.weights,
            build=lambda: get_model(name, weights=None, weights_backbone=None,
                                    num_classes=len(self.labels)),
            pretrained=lambda: get_model(name, weights="DEFAULT"))
        # Detection heads (NMS, box decoding) stay in fp32; half precision runs under
        # autocast on CUDA only.
        self.model = model.to(self.runtime.device).eval()
        with torch.inference_mode():
            self.model([torch.zeros(3, 64, 64, device=self.runtime.device)])
        return {**self.runtime.info(self.model), "model": name, "weights": weights,
                "weights_source": source, "num_classes": len(self.labels),
                "load_seconds": round(time.monotonic() - started, 2)}

    def execute_batch(self, items: list[DetectItem]) -> list[list[dict[str, Any]] | Exception]:
        import torch
        from torchvision.transforms.functional import to_tensor

        tensors, decoded, errors = self.runtime.decode_images(items, to_tensor)
        results: list[list[dict[str, Any]] | Exception | None] = list(errors)
        if tensors:
            device = self.runtime.device
            half = device.type == "cuda" and self.runtime.dtype != torch.float32
            with torch.inference_mode(), torch.autocast(device.type, self.runtime.dtype,
                                                        enabled=half):
                outputs = self.model([t.to(device, non_blocking=True) for t in tensors])
            for output, index in zip(outputs, decoded, strict=True):
                results[index] = self.detections(output, items[index].min_score)
        return results  # type: ignore[return-value]  # every slot is filled above

    def detections(self, output: dict[str, Any], min_score: float | None) -> list[dict[str, Any]]:
        """The boxes of one image over the threshold, best first (torchvision sorts them)."""
        threshold = self.settings.min_score if min_score is None else min_score
        keep = (output["scores"] >= threshold).nonzero().flatten()[:self.settings.max_detections]
        boxes = output["boxes"][keep].float().tolist()
        scores = output["scores"][keep].float().tolist()
        return [{"box": box, "class_id": c, "label": self.labels[c], "score": score}
                for box, c, score in zip(boxes, output["labels"][keep].tolist(), scores,
                                         strict=True)]
