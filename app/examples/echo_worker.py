"""The smallest useful worker: answers what the server learnt about each upload.

The worked example of ``WORKER_CLASS`` (README.md, "Serving another model") and the
trivial worker of ``benchmarks/server_bench.py``, where it measures what the pool and HTTP
layers cost when the model costs nothing. Serve it with::

    WORKER_CLASS=app.examples.echo_worker:EchoWorker make serve
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pydantic import BaseModel

from app.contract import ImageInput, WorkerConfig
from stateful_pool import SWorker


class Echo(BaseModel):
    format: str
    width: int
    height: int
    bytes: int
    sha256: str


class EchoWorker(SWorker[dict[str, Any], dict[str, Any]]):
    output_model = Echo

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": "cpu", "model": "echo", "weights": "none"}

    def execute(self, item: ImageInput) -> dict[str, Any]:
        return {"format": item.format, "width": item.width, "height": item.height,
                "bytes": len(item.data), "sha256": hashlib.sha256(item.data).hexdigest()}

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any]]:
        return [self.execute(item) for item in items]
