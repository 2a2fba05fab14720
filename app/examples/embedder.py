"""Image embeddings: uploaded images -> one vector per image (a timm backbone, no head).

One file, served with::

    WORKER_CLASS=app.examples.embedder:ImageEmbedder make serve
    curl -F files=@a.jpg -F files=@b.jpg http://127.0.0.1:8000/predict

``MODEL_NAME`` is any timm model (default ``vit_small_patch16_224``), created with
``num_classes=0`` so its output is the pooled feature vector. ``EMBEDDER_NORMALIZE=false``
returns the raw features instead of unit-length (L2-normalised) vectors (``GET /v1/model``
shows the setting under ``worker_settings``).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contract import ImageFile, ModelWorker, WorkerConfig
from app.runtime import TorchRuntime
from app.weights import load_timm


class EmbedderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_")

    normalize: bool = Field(True, description="L2-normalise each embedding")


class EmbedRequest(BaseModel):
    files: list[ImageFile] = Field(description="one or more images")


class Embedding(BaseModel):
    filename: str | None = Field(description="the upload's filename, if it had one")
    embedding: list[float] = Field(description="the image's feature vector")


class Embeddings(BaseModel):
    dim: int = Field(description="length of every embedding")
    embeddings: list[Embedding] = Field(description="one per uploaded file, in order")


class ImageEmbedder(ModelWorker):
    """A timm backbone without its classifier: one embedding per uploaded image."""

    default_model = "vit_small_patch16_224"
    settings_model = EmbedderSettings

    @classmethod
    def to_items(cls, request: EmbedRequest) -> list[ImageFile]:
        return request.files

    @classmethod
    def to_answer(cls, request: EmbedRequest, results: list[list[float]]) -> Embeddings:
        return Embeddings(
            dim=len(results[0]) if results else 0,
            embeddings=[Embedding(filename=f.filename, embedding=r)
                        for f, r in zip(request.files, results, strict=True)])

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        import torch

        started = time.monotonic()
        self.settings: EmbedderSettings = config.options
        self.runtime = TorchRuntime(config)
        model, weights, source = load_timm(config.model_name, config.weights, num_classes=0)
        import timm.data  # only now: huggingface_hub reads HF_HUB_OFFLINE at import

        self.model = model.to(self.runtime.device, self.runtime.dtype).eval()
        data_config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        with torch.inference_mode():  # warm-up, and learn the embedding size
            dim = self.model(torch.zeros((1, *data_config["input_size"]),
                                         device=self.runtime.device,
                                         dtype=self.runtime.dtype)).shape[-1]
        return {**self.runtime.info(self.model), "model": config.model_name,
                "weights": weights, "weights_source": source, "dim": int(dim),
                "load_seconds": round(time.monotonic() - started, 2)}

    def execute_batch(self, items: list[ImageFile]) -> list[list[float] | Exception]:
        import torch

        tensors, decoded, errors = self.runtime.decode_images(items, self.transform)
        results: list[list[float] | Exception | None] = list(errors)
        if tensors:
            with torch.inference_mode():
                batch = torch.stack(tensors).to(self.runtime.device, self.runtime.dtype)
                features = self.model(batch).float()
                if self.settings.normalize:
                    features = torch.nn.functional.normalize(features, dim=-1)
            for row, index in zip(features.cpu().tolist(), decoded, strict=True):
                results[index] = row
        return results  # type: ignore[return-value]  # every slot is filled above
