"""The application factory: settings -> worker class -> plan -> serving core -> protocols.

One uvicorn process, one pool: parallelism comes from the pool's worker processes (one per
GPU), never from uvicorn workers, each of which would load its own copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from .ops import tracing
from .ops.metrics import Metrics
from .ops.middleware import BodyLimitMiddleware, RequestContextMiddleware
from .protocols import PROTOCOLS, renderer_for
from .protocols.http import install_error_handlers, require_api_key
from .serving.core import ServedModel, ServingCore
from .serving.declaration import declaration_of
from .serving.plan import load_worker_class, make_plan, plan_workers
from .serving.shell import Telemetry
from .serving.state import ServerState
from .settings import Settings

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
    metrics = Metrics(state.pool_stats, state.random_weight_workers,
                      workers_planned=lambda: len(state.plan.configs),
                      failed_to_start=lambda: len(state.spawn_failures))
    core = ServingCore(state, [ServedModel(state.plan.served_name, state.plan.model_name,
                                           declaration)], metrics)
    app = FastAPI(
        title="stateful-pool inference server",
        summary=f"{state.plan.model_name} ({worker_cls.__name__}) behind a stateful_pool.SPool",
        lifespan=state.lifespan,
    )
    app.state.server = state
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.core = core
    # Without a key the dependency is left out, not merely short-circuited: resolving it
    # costs each request.
    guards = [require_api_key] if settings.api_key is not None else []
    for protocol in PROTOCOLS:
        protocol.mount(app, core, guards)
    render_for = renderer_for(PROTOCOLS)
    install_error_handlers(app, render_for)
    known_paths = {getattr(route, "path", "") for route in app.routes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       render_for=render_for, body_timeout=settings.body_timeout_s)
    if state.telemetry.tracing and not tracing.fastapi_traces_requests():
        app.add_middleware(tracing.TracingMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,
                       known_paths=lambda: known_paths, render_for=render_for,
                       refuse_now=core.refuse_now, reserve=core.shedder.reserve)
    return app
