"""Text embeddings: a JSON list of texts -> one unit-length vector per text.

One file, served with::

    WORKER_CLASS=app.examples.text_embedder:TextEmbedder make serve
    curl -H 'content-type: application/json' -d '{"input": ["a cat", "a dog"]}' \\
        http://127.0.0.1:8000/predict

It declares ``task = "embedding"``, so the OpenAI route answers it too::

    client.embeddings.create(model="byte-embedder", input=["a cat", "a dog"])

The model is the byte-level transformer encoder of ``app.examples.text`` (UTF-8 bytes in, no
tokenizer), mean-pooled over the bytes and normalised, without its classification head. Its
size and byte limit are ``TEXT_*`` settings, as for the classifier. Weights: ``MODEL_WEIGHTS``
as for the classifier: random (with a WARNING) unless a state dict of ``build_model`` is
given; a token here is a byte.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, Field

from app.contract import ModelWorker, WorkerConfig
from app.examples.text import TextSettings, build_model, encode
from app.runtime import TorchRuntime
from app.weights import load_weights


class EmbedRequest(BaseModel):
    input: list[Annotated[str, Field(min_length=1, max_length=100_000)]] = Field(
        min_length=1, max_length=256, description="the texts to embed")


class Embeddings(BaseModel):
    embeddings: list[list[float]] = Field(description="one unit vector per text, in order")
    prompt_tokens: int = Field(description="bytes read, over all texts")


class TextEmbedder(ModelWorker):
    """A byte-level transformer: one normalised vector per text."""

    default_model = "byte-embedder"
    settings_model = TextSettings
    task = "embedding"

    @classmethod
    def to_items(cls, request: EmbedRequest) -> list[str]:
        return request.input

    @classmethod
    def to_answer(cls, request: EmbedRequest, results: list[dict[str, Any]]) -> Embeddings:
        return Embeddings(embeddings=[r["vector"] for r in results],
                          prompt_tokens=sum(r["bytes"] for r in results))

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        import torch

        started = time.monotonic()
        self.settings: TextSettings = config.options
        self.runtime = TorchRuntime(config)
        model, weights, source = load_weights(
            config.model_name, config.weights, build=lambda: build_model(self.settings))
        self.model = model.to(self.runtime.device, self.runtime.dtype).eval()
        with torch.inference_mode():
            self._embed(["warm-up"])
        return {**self.runtime.info(self.model), "model": config.model_name,
                "weights": weights, "weights_source": source,
                "dimensions": self.settings.width,
                "load_seconds": round(time.monotonic() - started, 2)}

    def _embed(self, texts: list[str]) -> Any:
        import torch

        model: Any = self.model
        ids = encode(texts, self.settings.max_bytes).to(self.runtime.device)
        padding = ids == 0
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = model.encoder(model.embed(ids) + model.position(positions),
                          src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = model.norm((x * keep).sum(1) / keep.sum(1).clamp(min=1))
        return torch.nn.functional.normalize(pooled.float(), dim=-1), (~padding).sum(1)

    def execute_batch(self, items: list[str]) -> list[dict[str, Any]]:
        import torch

        with torch.inference_mode():
            vectors, lengths = self._embed(items)
        return [{"vector": v, "bytes": n}
                for v, n in zip(vectors.cpu().tolist(), lengths.cpu().tolist(), strict=True)]
