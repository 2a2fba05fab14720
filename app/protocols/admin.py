"""Operations on a running server: ``POST /admin/models/{name}/reload``.

Replaces a model's workers while requests flow (``ServerState.reload``): the new workers
spawn and warm up beside the old ones, new requests go to them once all have started, the
requests already taken by the old ones finish there, and no request fails. The body may
change what the workers load (``model_name``, ``weights``, the worker's ``settings``); an
empty body reloads the same weights (a checkpoint file rewritten in place, say).

Admin routes need ``API_KEY``: without one they answer 403, so a server reachable by
others cannot be told to load another model.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from ..serving.core import ServingCore
from ..serving.errors import ServingError
from ..serving.state import ReloadError
from .http import Guards, Protocol, detail_response, error_docs
from .schemas import ErrorBody


class Reload(BaseModel):
    """What to load instead; a field left out keeps its value."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str | None = Field(None, min_length=1,
                                   description="the model the new workers load (MODEL_NAME)")
    weights: str | None = Field(
        None, min_length=1, description="MODEL_WEIGHTS of the new workers: pretrained, "
                                        "random, hf-hub:org/name or a checkpoint file")
    settings: dict[str, Any] | None = Field(
        None, description="the worker's own settings (its settings_model) to change")


class Reloaded(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="the served name")
    model_name: str = Field(description="what the new workers loaded")
    weights: str
    workers: int = Field(description="new workers serving")
    seconds: float = Field(description="from the request to the swap (spawn and warm-up)")
    retiring_requests: int = Field(
        description="requests the old workers were still serving at the swap; they finish "
                    "there, then the old workers stop")


def check_admin_key(request: Request, core: ServingCore) -> None:
    key = core.settings.api_key
    if key is None:
        raise ServingError(403, "admin routes need API_KEY to be set on the server")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), key.get_secret_value().encode()):
        raise ServingError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    router = APIRouter(prefix="/admin", tags=["admin"])
    texts = {400: "the body is not valid JSON (or not UTF-8)",
             403: "API_KEY is not set: admin routes are off",
             404: "no model is served under this name",
             409: "a reload of this model, or its start-up, is under way",
             422: "the body does not match its schema, or the new settings are invalid",
             500: "the new workers could not start; the old ones serve on"}

    @router.post("/models/{name}/reload", response_model=Reloaded,
                 responses=error_docs([400, 401, 403, 404, 409, 422, 500], {"model": ErrorBody},
                                      texts))
    async def reload_model(request: Request, name: str,
                           body: Annotated[Reload | None, Body()] = None) -> Any:
        """Replace the model's workers with new ones, with no failed request (the new
        workers start beside the old: both must fit in memory during the swap)."""
        check_admin_key(request, core)
        changes = {} if body is None else body.model_dump(exclude_none=True)
        try:
            return await core.state.reload(name, changes)
        except ReloadError as exc:
            raise ServingError(exc.status, str(exc)) from None

    app.include_router(router)


PROTOCOL = Protocol("admin", mount, detail_response)
