"""The smallest useful worker: answers what the server learnt about each upload.

The worked example of ``WORKER_CLASS`` (README.md, "Serving another model") and the
trivial worker of ``benchmarks/server_bench.py``, where it measures what the pool and HTTP
layers cost when the model costs nothing. It takes the default classifier's request
(``files``, and a ``top_k`` it ignores), so the same clients and load tests drive both.
Serve it with::

    WORKER_CLASS=app.examples.echo_worker:EchoWorker make serve
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pydantic import BaseModel, Field

from app.contract import ImageFile, ImageInput, ModelWorker, WorkerConfig


class EchoRequest(BaseModel):
    files: list[ImageFile] = Field(description="one or more images")
    top_k: int = Field(5, ge=1, le=1000, description="accepted as the classifier does; unused")


class Echo(BaseModel):
    filename: str | None = Field(description="the upload's filename, if it had one")
    format: str
    width: int
    height: int
    bytes: int
    sha256: str


class Echoes(BaseModel):
    predictions: list[Echo] = Field(description="one entry per uploaded file, in order")


class EchoWorker(ModelWorker):
    """Echoes what the server learnt about each uploaded image, without a model."""

    @classmethod
    def to_items(cls, request: EchoRequest) -> list[ImageInput]:
        return [ImageInput(f.data, f.format, f.width, f.height, request.top_k)
                for f in request.files]

    @classmethod
    def to_answer(cls, request: EchoRequest, results: list[dict[str, Any]]) -> Echoes:
        return Echoes(predictions=[Echo(filename=f.filename, **r)
                                   for f, r in zip(request.files, results, strict=True)])

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": "cpu", "model": "echo", "weights": "none"}

    def execute(self, item: ImageInput) -> dict[str, Any]:
        return {"format": item.format, "width": item.width, "height": item.height,
                "bytes": len(item.data), "sha256": hashlib.sha256(item.data).hexdigest()}

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any]]:
        return [self.execute(item) for item in items]
