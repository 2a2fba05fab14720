"""Text classification: a JSON body of texts -> a label and a probability per text.

One file, served with::

    WORKER_CLASS=app.examples.text:TextClassifier make serve
    curl -H 'content-type: application/json' -d '{"texts": ["great value", "broke in a day"]}' \\
        http://127.0.0.1:8000/predict

The model is ``ByteTransformer``, defined here: a small transformer encoder that reads the
UTF-8 bytes of a text (no tokenizer, no vocabulary file: 256 byte ids plus padding), with
learned positions, masked mean pooling and a linear head over ``TEXT_LABELS``. Default size:
2 layers, width 128, 4 heads, about 0.45 M parameters; texts are cut at ``TEXT_MAX_BYTES``.

Weights: no pretrained weights are published for it. ``MODEL_WEIGHTS=auto`` starts it with
random weights and a WARNING (the labels are then meaningless); give a state dict saved
from a trained ``build_model(TextSettings())`` as a file (``.safetensors`` or ``.pth``) or
as ``hf-hub:org/name``. ``encode`` is the whole preprocessing, so training needs nothing else.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contract import ModelWorker, WorkerConfig
from app.runtime import TorchRuntime
from app.weights import load_weights

if TYPE_CHECKING:
    import torch

PAD = 0  # byte b is id b + 1


class TextSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXT_")

    labels: str = Field("negative,positive", description="class names, comma-separated")
    max_bytes: int = Field(512, ge=8, le=8192, description="UTF-8 bytes read per text")
    width: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)

    @property
    def label_names(self) -> list[str]:
        return [name.strip() for name in self.labels.split(",") if name.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> TextSettings:
        if len(self.label_names) < 2:
            raise ValueError(f"TEXT_LABELS needs at least two names, got {self.labels!r}")
        if self.width % self.heads:
            raise ValueError(f"TEXT_WIDTH ({self.width}) must be a multiple of TEXT_HEADS "
                             f"({self.heads})")
        return self


class TextRequest(BaseModel):
    texts: list[Annotated[str, Field(min_length=1, max_length=100_000)]] = Field(
        min_length=1, max_length=256, description="the texts to classify")


class TextPrediction(BaseModel):
    label: str = Field(description="the most probable class")
    class_id: int
    probability: float = Field(ge=0, le=1)


class TextPredictions(BaseModel):
    predictions: list[TextPrediction] = Field(description="one per text, in order")


def build_model(settings: TextSettings) -> torch.nn.Module:
    """A ``ByteTransformer`` of the configured size, with random weights."""
    import torch
    from torch import nn

    class ByteTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            width = settings.width
            self.embed = nn.Embedding(257, width, padding_idx=PAD)
            self.position = nn.Embedding(settings.max_bytes, width)
            layer = nn.TransformerEncoderLayer(width, settings.heads, 4 * width, dropout=0.0,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, settings.layers,
                                                 enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, len(settings.label_names))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            padding = ids == PAD
            positions = torch.arange(ids.shape[1], device=ids.device)
            x = self.encoder(self.embed(ids) + self.position(positions),
                             src_key_padding_mask=padding)
            keep = (~padding).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
            return self.head(self.norm(pooled))  # type: ignore[no-any-return]

    return ByteTransformer()


def encode(texts: list[str], max_bytes: int) -> torch.Tensor:
    """Byte ids (byte + 1), right-padded with 0 to the longest text of the batch."""
    import torch

    rows = [list(text.encode("utf-8")[:max_bytes]) for text in texts]
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long) + 1
    return ids


class TextClassifier(ModelWorker):
    """A byte-level transformer: one label and its probability per text."""

    default_model = "byte-transformer"
    settings_model = TextSettings

    @classmethod
    def to_items(cls, request: TextRequest) -> list[str]:
        return request.texts

    @classmethod
    def to_answer(cls, request: TextRequest,
                  results: list[dict[str, Any]]) -> TextPredictions:
        return TextPredictions.model_validate({"predictions": results})

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        import torch

        started = time.monotonic()
        self.settings: TextSettings = config.options
        self.labels = self.settings.label_names
        self.runtime = TorchRuntime(config)
        model, weights, source = load_weights(
            config.model_name, config.weights, build=lambda: build_model(self.settings))
        self.model = model.to(self.runtime.device, self.runtime.dtype).eval()
        with torch.inference_mode():
            self.model(encode(["warm-up"], self.settings.max_bytes).to(self.runtime.device))
        return {**self.runtime.info(self.model), "model": config.model_name,
                "weights": weights, "weights_source": source, "labels": self.labels,
                "load_seconds": round(time.monotonic() - started, 2)}

    def execute_batch(self, items: list[str]) -> list[dict[str, Any]]:
        import torch

        ids = encode(items, self.settings.max_bytes).to(self.runtime.device)
        with torch.inference_mode():
            probabilities = self.model(ids).float().softmax(dim=-1)
            top_p, top_i = (t.cpu().tolist() for t in probabilities.max(dim=-1))
        return [{"label": self.labels[c], "class_id": c, "probability": p}
                for c, p in zip(top_i, top_p, strict=True)]
