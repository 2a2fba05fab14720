"""The seed's ``server_simple``: replicas in the server process, a random one per request.

One model replica per GPU, all in this process. Each request draws a replica with
``random.choice`` and runs it through ``asyncio.to_thread``: nothing stops two threads from
running the same replica at once while another replica idles (no lock, no queue).
``python -m loadtest.seed.server_simple`` (settings: ``loadtest/seed/serving.py``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from .model import SeedModel
from .serving import devices, model_name, serve, share_cpu

replicas: list[SeedModel] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    plan = devices()
    share_cpu(plan[0], len(plan))
    replicas.extend(SeedModel(model_name(), device) for device in plan)
    app.state.workers = len(replicas)
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(files: Annotated[list[UploadFile], File()]) -> Any:
    images = [await upload.read() for upload in files]
    replica = random.choice(replicas)
    return {"predictions": await asyncio.to_thread(replica.process, images)}


if __name__ == "__main__":
    serve(app)
