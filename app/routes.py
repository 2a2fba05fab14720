"""The fixed endpoints: probes, metrics, model info, and the API key check.

The inference route is not here: it is derived from the served worker (``app.endpoint``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import error, unavailable
from .schemas import ErrorBody, Health, ModelInfo, Readiness
from .state import server_state

_bearer = HTTPBearer(auto_error=False, description="API_KEY, when the server sets one")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    key = server_state(request).settings.api_key
    if key is None:
        return
    # compare_digest: the time taken must not reveal how much of the key was right.
    if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), key.get_secret_value().encode()):
        raise HTTPException(401, "missing or invalid API key",
                            headers={"WWW-Authenticate": "Bearer"})


def build_router(guards: Sequence[Callable[..., Any]] = ()) -> APIRouter:
    """Probes, metrics and ``/v1/model``; ``guards`` (the API key check) on ``/v1/model``."""
    router = APIRouter()

    @router.get("/healthz", response_model=Health, tags=["probes"],
                responses={503: {"model": ErrorBody}})
    async def healthz(request: Request) -> Any:
        """Liveness: 200 while the server can serve now or recover by itself."""
        reason = server_state(request).unrecoverable_reason()
        if reason:
            return error(503, reason)
        return {"status": "ok"}

    @router.get("/readyz", response_model=Readiness, tags=["probes"],
                responses={503: {"model": ErrorBody}})
    async def readyz(request: Request) -> Any:
        """Readiness: 200 once at least one worker has its model loaded and is alive."""
        state = server_state(request)
        ready, total = state.worker_counts()
        if not ready:
            return unavailable(state.not_ready_reason())
        return {"status": "ready", "workers_ready": ready, "workers": total,
                **state.weights_summary()}

    @router.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/model", response_model=ModelInfo, tags=["inference"],
                dependencies=[Depends(g) for g in guards])
    async def model_info(request: Request) -> Any:
        """What is served: model, weights and device of each worker, batching settings."""
        return server_state(request).model_info()

    return router
