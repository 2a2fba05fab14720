"""``server_dp``: the server many users write first; not in the seed's published comparison.

One process, one model: ``torch.nn.DataParallel`` over every visible GPU (on CPU, the plain
model using every core), behind an ``asyncio.Semaphore(1)`` so one request's batch runs at a
time; the forward pass runs in ``asyncio.to_thread`` to keep the event loop free.
DataParallel splits each request's batch across the GPUs, so a request of one image uses
one GPU. ``python -m loadtest.seed.server_dp`` (settings: ``loadtest/seed/serving.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from .model import SeedModel
from .serving import devices, model_name, serve, share_cpu

model: SeedModel | None = None
semaphore = asyncio.Semaphore(1)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global model
    device = devices()[0]
    share_cpu(device, 1)
    model = SeedModel(model_name(), device, data_parallel=True)
    app.state.workers = 1
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(files: Annotated[list[UploadFile], File()]) -> Any:
    images = [await upload.read() for upload in files]
    assert model is not None
    async with semaphore:
        return {"predictions": await asyncio.to_thread(model.process, images)}


if __name__ == "__main__":
    serve(app)
