"""The application factory: settings -> worker class -> plan -> routes; the state owns the pool.

One uvicorn process, one pool: parallelism comes from the pool's worker processes (one per
GPU), never from uvicorn workers, each of which would load its own copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from . import tracing
from .endpoint import add_inference_route, declaration_of
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .plan import load_worker_class, make_plan, plan_workers
from .routes import build_router, require_api_key
from .served import Telemetry
from .settings import Settings
from .state import ServerState
from .v2 import build_v2_router

__all__ = ["create_app", "load_worker_class", "plan_workers"]


def create_app(settings: Settings | None = None, *,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the server.

    Args:
        settings: the configuration; default read from the environment.
        on_fatal: called when no worker could start (``python -m app`` exits with 1);
            without it the server stays up, unready, and ``/healthz`` answers 503.

    Raises:
        ValueError: ``WORKER_CLASS`` cannot be imported or declares its types wrongly, its
            own settings are invalid, or ``DEVICE=cuda`` without a GPU.
    """
    settings = settings or Settings()
    worker_cls = load_worker_class(settings.worker_class)
    declaration = declaration_of(worker_cls)
    state = ServerState(settings, worker_cls, make_plan(settings, worker_cls), on_fatal)
    state.telemetry = Telemetry(settings.log_format, tracing.enable())
    metrics = Metrics(state.pool_stats, state.random_weight_workers)
    app = FastAPI(
        title="stateful-pool inference server",
        summary=f"{state.plan.model_name} ({worker_cls.__name__}) behind a stateful_pool.SPool",
        lifespan=state.lifespan,
    )
    app.state.server = state
    app.state.settings = settings
    app.state.metrics = metrics
    # Without a key the dependency is left out, not merely short-circuited: resolving it
    # costs each request.
    guards = [require_api_key] if settings.api_key is not None else []
    add_inference_route(app.router, declaration, guards)
    app.include_router(build_router(guards))
    app.include_router(build_v2_router(declaration, state.plan.model_name, guards))
    install_error_handlers(app)
    known_paths = {getattr(route, "path", "") for route in app.routes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if state.telemetry.tracing and not tracing.fastapi_traces_requests():
        app.add_middleware(tracing.TracingMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,
                       known_paths=lambda: known_paths)
    return app
