"""The HTTP layer the small comparison servers share; only their ``Dispatcher`` differs.

Each server (``server_simple``, ``server_mp``, ``server_spool``) is this FastAPI app plus one
class that decides which model replica runs a request. They read the same environment
variables as ``app/`` (``app.settings.Settings``: MODEL_NAME, MODEL_WEIGHTS, DEVICE,
NUM_WORKERS, HOST, PORT...), plan their workers with ``app.main.plan_workers`` (one per GPU,
or NUM_WORKERS CPU workers sharing the cores) and load the model with the same worker class
(``app.worker.ViTWorker`` unless WORKER_CLASS says otherwise), so a comparison measures
dispatch, not model code.

What they deliberately lack, next to ``app/``: per-image tasks, crash recovery, deadlines,
queue limits, metrics, auth. They answer ``/predict`` and ``/readyz`` with the same shapes.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse

from app.contract import ImageInput, InvalidImageError, WorkerConfig
from app.images import ImageRejected, inspect_image
from app.main import load_worker_class, plan_workers
from app.settings import Settings

logger = logging.getLogger("loadtest.server")


class Dispatcher(Protocol):
    """Runs the model for a request on one of its replicas."""

    def start(self, plan: list[WorkerConfig]) -> None:
        """Begin loading one replica per entry of ``plan``; return at once."""

    def ready_count(self) -> int:
        """Replicas loaded and able to run a request now."""

    async def run(self, items: list[ImageInput]) -> list[Any]:
        """One result dict (or exception instance) per item, in order."""

    def stop(self) -> None:
        """Stop every replica; bounded in time."""


def create_app(dispatcher: Dispatcher, settings: Settings) -> FastAPI:
    plan = plan_workers(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dispatcher.start(plan)
        try:
            yield
        finally:
            dispatcher.stop()

    app = FastAPI(lifespan=lifespan)

    @app.post("/predict")
    async def predict(files: Annotated[list[UploadFile], File()],
                      top_k: Annotated[int, Query(ge=1, le=1000)] = 5) -> Any:
        items = []
        for number, upload in enumerate(files, 1):
            data = await upload.read()
            try:
                header = inspect_image(data, max_pixels=settings.max_image_pixels,
                                       name=f"file {number}")
            except ImageRejected as exc:
                raise HTTPException(exc.status_code, exc.detail) from None
            items.append(ImageInput(data, header.format, header.width, header.height, top_k))
        if not dispatcher.ready_count():
            raise HTTPException(503, "no model replica is ready")
        try:
            results = await dispatcher.run(items)
        except Exception as exc:  # a dead replica: these servers have no recovery
            logger.exception("request failed")
            raise HTTPException(500, f"{type(exc).__name__}: {exc}") from None
        for result in results:
            if isinstance(result, InvalidImageError):
                raise HTTPException(400, str(result))
            if isinstance(result, Exception):
                raise HTTPException(500, f"{type(result).__name__}: {result}")
        return {"predictions": [{"filename": upload.filename, **result}
                                for upload, result in zip(files, results, strict=True)]}

    @app.get("/readyz")
    async def readyz() -> Any:
        ready = dispatcher.ready_count()
        body = {"status": "ready" if ready else "loading", "workers_ready": ready,
                "workers": len(plan)}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app


def serve(make_dispatcher: type[Dispatcher]) -> None:
    """Run one server on HOST:PORT until SIGTERM or Ctrl-C (uvicorn stops it cleanly)."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s %(message)s")
    dispatcher = make_dispatcher(load_worker_class(settings.worker_class),  # type: ignore[call-arg]
                                 settings)
    server = uvicorn.Server(uvicorn.Config(
        create_app(dispatcher, settings), host=settings.host, port=settings.port,
        log_level=settings.log_level, access_log=False, lifespan="on"))
    # uvicorn re-raises the signal it caught once shutdown is complete (exit status -15); a
    # finished drain should exit 0 like `python -m app`, so a kill stays distinguishable.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
