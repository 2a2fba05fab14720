"""The HTTP endpoints. Handlers stay thin: checks in ``images``, errors in ``errors``."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from stateful_pool import SPool

from .contract import ImageInput, InvalidImageError
from .errors import error, unavailable
from .images import ImageRejected, inspect_image
from .schemas import ErrorBody, Health, ModelInfo, Readiness, predict_response_model

if TYPE_CHECKING:
    from .main import ServerState

_bearer = HTTPBearer(auto_error=False, description="API_KEY, when the server sets one")

PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in {
        400: "empty file, corrupt or truncated image",
        401: "API_KEY is set and the bearer token is missing or wrong",
        413: "body over MAX_UPLOAD_MB, more than MAX_FILES files, or too many pixels",
        415: "not an image, or a format outside JPEG, PNG, WebP, BMP, GIF",
        422: "no `files` field",
        500: "the model worker crashed under this request (it is restarted)",
        503: "queue full or no worker ready; see Retry-After",
        504: "no answer within REQUEST_TIMEOUT_S",
    }.items()}


def server_state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


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


async def execute_one(pool: SPool[Any, Any], item: ImageInput, name: str) -> Any:
    try:
        return await pool.async_execute(item)
    except InvalidImageError as exc:
        raise ImageRejected(400, f"{name}: {exc}") from None


async def execute_all(pool: SPool[Any, Any], items: Sequence[ImageInput],
                      names: Sequence[str]) -> list[Any]:
    """Submit each image as its own task (so it can share a batch with other clients'),
    and fail fast: the first error cancels the images of this request still queued."""
    if len(items) == 1:
        return [await execute_one(pool, items[0], names[0])]
    tasks = [asyncio.ensure_future(execute_one(pool, item, name))
             for item, name in zip(items, names, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        # Collect the siblings' outcomes so none is reported as "never retrieved".
        await asyncio.gather(*tasks, return_exceptions=True)


def build_router(output_model: type[BaseModel] | None, *, auth: bool) -> APIRouter:
    """The routes, with ``/predict`` typed by the served worker's ``output_model``.

    ``auth``: whether ``/predict`` and ``/v1/model`` check the API key. Without a key the
    dependency is left out, not merely short-circuited: resolving it costs each request.
    """
    router = APIRouter()
    predict_response = predict_response_model(output_model)
    guarded = [Depends(require_api_key)] if auth else []

    @router.post("/predict", response_model=predict_response, responses=PREDICT_ERRORS,
                 dependencies=guarded, tags=["inference"])
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description="one or more images")],
        top_k: Annotated[int, Query(ge=1, le=1000, description="classes per image")] = 5,
    ) -> Any:
        """Classify the uploaded images; answers one prediction per file, in order."""
        state = server_state(request)
        settings = state.settings
        if len(files) > settings.max_files:
            raise ImageRejected(
                413, f"{len(files)} files in one request; the limit is {settings.max_files} "
                     "(MAX_FILES)")
        items, names = [], []
        for number, upload in enumerate(files, 1):
            data = await upload.read()
            name = f"file {number} ({upload.filename})" if upload.filename else f"file {number}"
            header = inspect_image(data, max_pixels=settings.max_image_pixels, name=name)
            items.append(ImageInput(data, header.format, header.width, header.height, top_k))
            names.append(name)
        outputs = await execute_all(state.ready_pool(), items, names)
        return {"predictions": [
            {"filename": upload.filename, **output}
            for upload, output in zip(files, outputs, strict=True)]}

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
        return {"status": "ready", "workers_ready": ready, "workers": total}

    @router.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/model", response_model=ModelInfo, tags=["inference"],
                dependencies=guarded)
    async def model_info(request: Request) -> Any:
        """What is served: model, weights and device of each worker, batching settings."""
        return server_state(request).model_info()

    return router
