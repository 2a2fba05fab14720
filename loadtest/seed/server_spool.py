"""The seed's ``server_spool``: ``SPool`` with a worker per GPU; a whole request is one task.

The lifespan spawns one worker per GPU at once (``asyncio.gather`` of ``async_spawn``);
``/predict`` awaits ``pool.async_execute`` with the request's images, so an idle worker
always takes the oldest waiting request. ``QUEUE_SIZE`` bounds the requests waiting.
``python -m loadtest.seed.server_spool`` (settings: ``loadtest/seed/serving.py``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from stateful_pool import SPool, SWorker

from .model import SeedModel
from .serving import devices, model_name, serve, share_cpu


class SeedWorker(SWorker[None, list[dict[str, Any]]]):
    def spawn(self, name: str, device: str, replicas: int) -> None:
        share_cpu(device, replicas)
        self.model = SeedModel(name, device)

    def execute(self, images: list[bytes]) -> list[dict[str, Any]]:
        return self.model.process(images)


# Made in the lifespan, not at import: spawned workers import this module too.
pool: SPool[None, list[dict[str, Any]]] | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global pool
    plan = devices()
    with SPool(SeedWorker, queue_size=int(os.environ.get("QUEUE_SIZE") or 256)) as pool:
        await asyncio.gather(*(pool.async_spawn(model_name(), device, len(plan))
                               for device in plan))
        app.state.workers = len(plan)
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(files: Annotated[list[UploadFile], File()]) -> Any:
    images = [await upload.read() for upload in files]
    assert pool is not None
    return {"predictions": await pool.async_execute(images)}


if __name__ == "__main__":
    serve(app)
