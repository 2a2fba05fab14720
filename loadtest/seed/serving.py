"""What the four seed-shaped servers share: their settings, device plan, routes beside
``/predict``, and how they run.

Settings come from the environment, with the names ``app/`` uses: ``MODEL_NAME`` (default
``torchvision:vit_l_16``), ``DEVICE`` (``auto``, ``cuda`` or ``cpu``), ``NUM_WORKERS``
(replicas; default one per GPU, or 1 on CPU; see ``devices``), ``QUEUE_SIZE``
(``server_spool``), ``HOST``, ``PORT``, ``LOG_LEVEL``. ``MODEL_WEIGHTS`` and ``PRECISION``
are not read: the seed ran random weights in fp32, and so do these servers.

The seed's servers loaded their models in the lifespan, before uvicorn accepts a connection,
so ``/readyz`` answers 200 with every worker ready as soon as it answers at all; it exists
for the runner, which waits on it as it does for ``app/``.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .model import DEFAULT_MODEL, BadImage


def model_name() -> str:
    return os.environ.get("MODEL_NAME") or DEFAULT_MODEL


def devices() -> list[str]:
    """One device per replica: one replica per GPU, as the seed ran.

    ``NUM_WORKERS`` sets the number of replicas instead: on CPU (default 1), or on GPUs,
    placed round-robin (two replicas on one GPU bring back the random dispatch's imbalance
    on a one-GPU machine, though they share that GPU's compute; not in the seed).
    """
    import torch

    wanted = (os.environ.get("DEVICE") or "auto").lower()
    if wanted not in ("auto", "cuda", "cpu"):
        raise ValueError(f"DEVICE must be auto, cuda or cpu, got {wanted!r}")
    count = os.environ.get("NUM_WORKERS")
    if count is not None and int(count) < 1:
        raise ValueError(f"NUM_WORKERS must be >= 1, got {count}")
    if wanted != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [f"cuda:{index % gpus}" for index in range(int(count or gpus))]
    if wanted == "cuda":
        raise RuntimeError("DEVICE=cuda, but torch sees no GPU")
    return ["cpu"] * int(count or 1)


def share_cpu(device: str, replicas: int) -> None:
    """On CPU, give each of ``replicas`` concurrent forward passes its slice of the cores.

    Not in the seed (it ran on GPUs, where torch's default is harmless): without it, two CPU
    replicas each start one thread per core and spend their time waiting on each other.
    Runs in the process that holds the model(s).
    """
    if device != "cpu":
        return
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // replicas))


async def bad_image(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=400)


def serve(app: FastAPI) -> None:
    """Run ``app`` on HOST:PORT until SIGTERM or Ctrl-C.

    The lifespan must set ``app.state.workers`` (replicas loaded) before it yields.
    """
    import uvicorn

    level = (os.environ.get("LOG_LEVEL") or "info").lower()
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s %(message)s")
    app.add_exception_handler(BadImage, bad_image)

    @app.get("/readyz")
    async def readyz() -> Any:
        workers = app.state.workers
        return {"status": "ready", "workers_ready": workers, "workers": workers}

    server = uvicorn.Server(uvicorn.Config(
        app, host=os.environ.get("HOST") or "127.0.0.1",
        port=int(os.environ.get("PORT") or 8000), log_level=level, access_log=False))
    # uvicorn re-raises the signal it caught once shutdown is done (exit status -15); a clean
    # stop should exit 0, as `python -m app` does.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    # uvicorn and the lifespan are done: spare the interpreter's exit a collection over every
    # object torch created (about 2 s on 2 cores, in the runner's wait for the server's exit).
    gc.freeze()
