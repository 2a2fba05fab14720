"""What every HTTP protocol shares: the ``Protocol`` record, the deadline header, the
disconnect watch, the API key, and the translation of FastAPI's own errors.

A protocol module defines ``PROTOCOL = Protocol(name, mount, render, prefixes)``:

* ``mount(app, core, guards)`` adds its routes, which call the ``ServingCore``;
* ``render(error)`` turns a ``ServingError`` into a response in the protocol's shape;
* ``prefixes``: the paths it owns. Any error answered on them (a refused body size, load
  shedding, a bad API key, an unknown path) is rendered by its ``render``, whoever raised it.

``app.protocols`` lists the protocols; FastAPI's ``{"detail": ...}`` (``detail_response``)
is the shape of the paths no protocol claims.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ..ops.middleware import RECEIVED_AT
from ..serving.errors import CLIENT_CLOSED, MEANINGS, ServingError

if TYPE_CHECKING:
    from ..serving.core import ServingCore
    from ..serving.lifetime import Lifetime

logger = logging.getLogger("app.errors")

Renderer = Callable[[ServingError], Response]
Guards = Sequence[Callable[..., Any]]

DEADLINE_HEADER = "X-Request-Timeout"
DeadlineHeader = Annotated[float | None, Header(
    alias=DEADLINE_HEADER, ge=0.001, allow_inf_nan=False,
    description="Seconds the client will wait for the answer (decimal, at least 0.001). "
                "Shortens "
                "the server's REQUEST_TIMEOUT_S, never extends it; past it the request's "
                "queued work is dropped and the answer is 504.")]


@dataclass(frozen=True)
class Protocol:
    """One wire format around the serving core (module docstring)."""

    name: str
    mount: Callable[[FastAPI, ServingCore, Guards], None]
    render: Renderer
    prefixes: tuple[str, ...] = ()


def core_of(request: Request) -> ServingCore:
    return request.app.state.core  # type: ignore[no-any-return]


# ---- rendering -------------------------------------------------------------------------------

def error_response(error: ServingError, body: Mapping[str, Any]) -> Response:
    """``body`` as JSON with the error's status and headers; a 499 has no body (nobody
    reads it: the status is for the access log and the metrics)."""
    if error.status == CLIENT_CLOSED:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(dict(body), status_code=error.status, headers=error.headers or None)


def detail_response(error: ServingError) -> Response:
    """FastAPI's shape: ``{"detail": message}``, or the list of problems of a 422."""
    return error_response(error, {"detail": error.message if error.errors is None
                                  else encodable_errors(error.errors)})


def error_docs(statuses: Sequence[int], schema: Any, overrides: Mapping[int, str] | None = None
               ) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of a route's error answers, from the one table of meanings."""
    texts = {**MEANINGS, **(overrides or {})}
    return {status: {"description": texts[status], **schema} for status in sorted(statuses)}


# ---- errors raised outside the core ----------------------------------------------------------

def json_safe(value: Any) -> Any:
    """``value`` with its non-finite floats as strings (``"NaN"``, ``"Infinity"``).

    Python's json module parses ``NaN`` and ``Infinity`` in a request body, but strict JSON
    has no such values: an error answer that echoes them back could not be encoded.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def encodable_errors(errors: Sequence[Any]) -> list[Any]:
    """Validation errors as JSON, echoing the client's input where it can be encoded; an
    input nested too deeply to encode is left out rather than turning a 422 into a 500."""
    try:
        encoded = json_safe(jsonable_encoder(list(errors)))
        json.dumps(encoded)
    except RecursionError:
        encoded = json_safe(jsonable_encoder([
            {k: v for k, v in e.items() if k != "input"} if isinstance(e, dict) else e
            for e in errors]))
    return encoded  # type: ignore[no-any-return]


def http_error(request: Request, exc: Exception) -> ServingError:
    """A ``ServingError`` for what FastAPI and Starlette raise around the core: a body that
    failed validation (422), an HTTP error (401, 404, 405, 413...), a client that left while
    sending its body (499), a JSON body that is not UTF-8 (400)."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, RequestValidationError):
        return ServingError(422, "the request does not match its schema",
                            errors=list(exc.errors()))
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):
        return core_of(request).client_left(request.scope.get(RECEIVED_AT),
                                            ", while sending its request body")
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return ServingError(400, f"the request body is not valid UTF-8: {exc.__cause__}")
    detail = exc.detail
    return ServingError(exc.status_code, detail if isinstance(detail, str) else "error",
                        exc.headers, errors=None if isinstance(detail, str) else detail)


def install_error_handlers(app: FastAPI, render_for: Callable[[str], Renderer]) -> None:
    """Every error raised while a request is handled is rendered by the protocol whose path
    was asked for; anything else is answered 500 by ``RequestContextMiddleware``."""

    async def render(request: Request, exc: Exception) -> Response:
        error = http_error(request, exc)
        return render_for(request.url.path)(error)

    for exc_type in (ServingError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc_type, render)


# ---- a request's lifetime over HTTP ---------------------------------------------------------

def request_lifetime(request: Request, client_limits: Mapping[str, float | None],
                     core: ServingCore | None = None) -> Lifetime:
    """The request's deadline, counted from its arrival, and the watch on its connection;
    ``core``: the app's (default: looked up in ``app.state``)."""
    return (core or core_of(request)).lifetime(request.scope.get(RECEIVED_AT), client_limits,
                                               lambda: disconnected(request.receive))


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone, without polling. Call only once the request body
    has been read: the next ASGI message is then ``http.disconnect``, sent when the
    connection closes. (Starlette's ``request.is_disconnected()`` polled per request would
    cost a cancel scope and a timed receive on every poll.)"""
    while (await receive())["type"] != "http.disconnect":
        pass  # a body chunk nobody asked for (the route read its body already)


# ---- the API key -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="API_KEY, when the server sets one")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    key = core_of(request).settings.api_key
    if key is None:
        return
    # compare_digest: the time taken must not reveal how much of the key was right.
    if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), key.get_secret_value().encode()):
        raise ServingError(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})
