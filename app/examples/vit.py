"""The default model: a timm image classifier (default ViT-L/16) in one worker process.

One file serves a model (docs/SERVE_YOUR_MODEL.md). This one declares:

* the request: ``ClassifyRequest``, uploaded ``files`` and a ``top_k`` query parameter;
* the answer: ``Classifications``, one ``top_k`` list per file, in upload order;
* ``to_items`` / ``to_answer``: one pool item per image, so images of different requests
  share a forward pass;
* ``spawn`` / ``execute_batch``: load the model once, then decode and classify batches;
* ``settings_model``: ``TorchSettings`` (``DECODE``, ``COMPILE``, ``TF32``, ``PREPARE_CHUNK``:
  the GPU path, docs/GPU.md).

Serve it with ``make serve``: the default ``WORKER_CLASS=app.worker:ViTWorker`` names it
(``app.worker`` re-exports this module).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from app.contract import ImageFile, ImageInput, InvalidImageError, ModelWorker, WorkerConfig
from app.runtime import ImageBatches, TorchRuntime, TorchSettings
from app.weights import hub_unreachable_reason, load_timm

if TYPE_CHECKING:
    import torch

__all__ = ["ClassifyRequest", "Classifications", "ViTWorker", "hub_unreachable_reason"]

logger = logging.getLogger("app.worker")  # named after its public path


class ClassifyRequest(BaseModel):
    files: list[ImageFile] = Field(description="one or more images")
    top_k: int = Field(5, ge=1, le=1000, description="classes per image")


class Label(BaseModel):
    class_id: int = Field(description="index of the class in the model's output")
    label: str = Field(description="human-readable class name")
    probability: float = Field(ge=0, le=1)


class ClassificationPrediction(BaseModel):
    filename: str | None = Field(description="the upload's filename, if it had one")
    top_k: list[Label] = Field(description="the most probable classes, most probable first")


class Classifications(BaseModel):
    predictions: list[ClassificationPrediction] = Field(
        description="one entry per uploaded file, in order")


class ViTWorker(ModelWorker):
    """A timm classifier; batches of uploaded images go through one forward pass."""

    default_model = "vit_large_patch16_224"
    settings_model = TorchSettings

    @classmethod
    def to_items(cls, request: ClassifyRequest) -> list[ImageInput]:
        return [ImageInput(f.data, f.format, f.width, f.height, request.top_k)
                for f in request.files]

    @classmethod
    def to_answer(cls, request: ClassifyRequest,
                  results: list[dict[str, Any]]) -> Classifications:
        return Classifications(predictions=[
            ClassificationPrediction(filename=f.filename, top_k=r["top_k"])
            for f, r in zip(request.files, results, strict=True)])

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        """Load the model on its device. Runs in the worker process."""

        started = time.monotonic()
        self.config = config
        self.runtime = TorchRuntime(config)
        self.device, self.dtype = self.runtime.device, self.runtime.dtype
        model, weights, weights_source = load_timm(config.model_name, config.weights)
        import timm.data  # only now: huggingface_hub reads HF_HUB_OFFLINE at import

        self.model = model.to(self.device, self.dtype).eval()
        data_config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.images = ImageBatches(self.runtime, self.transform)
        self.labels = class_names(self.model)
        self.num_classes = len(self.labels)
        self.forward, warmup = self.runtime.prepare_model(self.model, data_config["input_size"])
        info = {
            **self.runtime.info(self.model),
            **self.images.info(),
            **warmup,
            "model": config.model_name,
            "weights": weights,
            "weights_source": weights_source,
            "num_classes": self.num_classes,
            "input_size": list(data_config["input_size"]),
            "load_seconds": round(time.monotonic() - started, 2),
        }
        logger.info("worker %d ready: %s on %s, weights=%s (%s), %.1f s",
                    config.worker_index, config.model_name, info["device"], weights,
                    weights_source, info["load_seconds"])
        return info

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any] | Exception]:
        """Decode each image, run the good ones through the model. Runs in the worker."""
        import torch

        errors: list[InvalidImageError | None] = [None] * len(items)
        logits, decoded = [], []
        with torch.inference_mode():
            # On CUDA each forward only queues kernels: the next chunk is decoded meanwhile.
            for inputs, positions in self.images.batches(items, errors):
                logits.append(self.forward(inputs))
                decoded.extend(positions)
            if decoded:
                k = min(self.num_classes, max(items[i].top_k for i in decoded))
                probabilities = torch.cat(logits).float().softmax(dim=-1)
                top_p, top_i = (t.cpu().tolist() for t in probabilities.topk(k, dim=-1))
        # A corrupt image fails its own item only, never its batch neighbours.
        results: list[dict[str, Any] | Exception | None] = list(errors)
        if decoded:
            for row, index in enumerate(decoded):
                n = min(k, items[index].top_k)
                results[index] = {"top_k": [
                    {"class_id": c, "label": self.labels[c], "probability": p}
                    for c, p in zip(top_i[row][:n], top_p[row][:n], strict=True)]}
        return results  # type: ignore[return-value]  # every slot is filled above


def class_names(model: torch.nn.Module) -> list[str]:
    """Readable names of the model's classes (ImageNet names ship inside timm)."""
    import timm.data

    num_classes: int = model.num_classes  # type: ignore[assignment]
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]
