"""The seed's ``server_mp``: a process per GPU over a pipe, a random process per request.

Each worker process (spawn start method) loads one replica and answers one message at a
time on its ``multiprocessing.Pipe``. A global ``asyncio.Semaphore(2 x GPUs)`` caps the
requests being dispatched; each picks a worker at random and waits on that worker's
``asyncio.Lock`` (one exchange per pipe at a time), even when another worker is idle; the
blocking send/recv round trip runs in ``asyncio.to_thread``.
``python -m loadtest.seed.server_mp`` (settings: ``loadtest/seed/serving.py``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from .model import SeedModel
from .serving import devices, model_name, serve, share_cpu


def worker_main(conn: Connection, name: str, device: str, replicas: int) -> None:
    """Load the replica, then answer each message until ``None``. Runs in the worker process."""
    share_cpu(device, replicas)
    model = SeedModel(name, device)
    conn.send("ready")
    while (images := conn.recv()) is not None:
        try:
            conn.send(model.process(images))
        except Exception as exc:  # send it back: an unanswered message would stall the pipe
            conn.send(exc)


def round_trip(conn: Connection, images: list[bytes]) -> Any:
    conn.send(images)
    return conn.recv()


workers: list[tuple[Connection, multiprocessing.process.BaseProcess, asyncio.Lock]] = []
semaphore = asyncio.Semaphore(1)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global semaphore
    context = multiprocessing.get_context("spawn")
    plan = devices()
    for device in plan:
        conn, child = context.Pipe()
        process = context.Process(target=worker_main, args=(child, model_name(), device,
                                                            len(plan)))
        process.start()
        workers.append((conn, process, asyncio.Lock()))
    await asyncio.gather(*(asyncio.to_thread(conn.recv) for conn, _, _ in workers))
    semaphore = asyncio.Semaphore(2 * len(workers))
    app.state.workers = len(workers)
    yield
    for conn, worker, _ in workers:
        try:
            conn.send(None)
        except OSError:  # that worker is already gone
            pass
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()


app = FastAPI(lifespan=lifespan)


@app.post("/predict")
async def predict(files: Annotated[list[UploadFile], File()]) -> Any:
    images = [await upload.read() for upload in files]
    async with semaphore:
        conn, _, lock = random.choice(workers)
        async with lock:
            result = await asyncio.to_thread(round_trip, conn, images)
    if isinstance(result, Exception):
        raise result
    return {"predictions": result}


if __name__ == "__main__":
    serve(app)
