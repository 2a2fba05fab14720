"""The server's own routes: probes, metrics and model info, in FastAPI's ``{"detail"}`` shape.

``/healthz`` (liveness) and ``/readyz`` (readiness) read the serving core, as KServe v2's
health routes do; ``/v1/model`` says what is served, behind the API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..serving.core import ServingCore
from .http import Guards, Protocol, detail_response
from .schemas import ErrorBody, Health, ModelInfo, Readiness


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    app.include_router(build_router(core, guards))


def build_router(core: ServingCore, guards: Guards = ()) -> APIRouter:
    """Probes, metrics and ``/v1/model``; ``guards`` (the API key check) on ``/v1/model``."""
    router = APIRouter()

    @router.get("/healthz", response_model=Health, tags=["probes"],
                responses={503: {"model": ErrorBody}})
    async def healthz() -> Any:
        """Liveness: 200 while the server can serve now or recover by itself."""
        error = core.liveness()
        return detail_response(error) if error else {"status": "ok"}

    @router.get("/readyz", response_model=Readiness, tags=["probes"],
                response_model_exclude_none=True, responses={503: {"model": ErrorBody}})
    async def readyz() -> Any:
        """Readiness: 200 once at least one worker has its model loaded and is alive;
        ``status`` is ``degraded`` (still 200) while fewer workers serve than planned, and
        ``reason`` says which and why."""
        error = core.readiness()
        if error:
            return detail_response(error)
        ready, total = core.state.worker_counts()
        degraded = core.state.degraded_reason()
        models = None
        if len(core.models) > 1:
            models = {}
            for name, model in core.state.models.items():
                serving, planned = model.worker_counts()
                models[name] = {"ready": serving > 0, "workers_ready": serving,
                                "workers": planned, "reason": model.degraded_reason()}
        return {"status": "degraded" if degraded else "ready", "reason": degraded,
                "workers_ready": ready, "workers": total, **core.state.weights_summary(),
                "models": models}

    @router.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/model", response_model=ModelInfo, tags=["inference"],
                dependencies=[Depends(g) for g in guards])
    async def model_info(request: Request) -> Any:
        """What is served (the default model, with several): model, weights and device of
        each worker, batching settings."""
        return core.state.model_info()

    @router.get("/models/{name}", response_model=ModelInfo, tags=["inference"],
                dependencies=[Depends(g) for g in guards],
                responses={404: {"model": ErrorBody, "description": "no such model"}})
    async def named_model_info(name: str) -> Any:
        """One served model: its readiness, weights, devices, batching and workers."""
        return core.state_of(core.model(name)).model_info()

    return router


PROTOCOL = Protocol("probes", mount, detail_response)
