"""The application factory: settings -> models (worker class, plan, state) -> serving core ->
protocols.

One pool per model (one model, or those of ``MODELS_FILE``): parallelism comes from the
pools' worker processes (one per GPU), never from uvicorn workers, each of which would load
its own copy of the model. ``API_PROCESSES=N`` runs N copies of this app against pools owned
by one other process (``app.serving.frontends``).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from .ops import tracing
from .ops.metrics import Metrics
from .ops.middleware import RequestContextMiddleware
from .protocols import PROTOCOLS, renderer_for
from .protocols.http import install_error_handlers, require_api_key
from .serving.core import ServedModel, ServingCore
from .serving.declaration import declaration_of
from .serving.models_file import ModelsFileError, read_models_file, worker_options
from .serving.plan import load_worker_class, make_plan, plan_workers
from .serving.shell import Telemetry
from .serving.state import ModelState, ServerState
from .settings import Settings

__all__ = ["create_app", "load_worker_class", "plan_workers"]


def create_app(settings: Settings | None = None, *,
               on_fatal: Callable[[], None] | None = None,
               state_cls: type[ServerState] = ServerState) -> FastAPI:
    """Build the server.

    Args:
        settings: the configuration; default read from the environment.
        on_fatal: called when no worker could start (``python -m app`` exits with 1);
            without it the server stays up, unready, and ``/healthz`` answers 503.
        state_cls: what holds the models' pools: ``ServerState`` spawns them; an API
            process of ``API_PROCESSES=N`` reaches those of the process that owns them.

    Raises:
        ValueError: ``WORKER_CLASS`` cannot be imported or declares its types wrongly, its
            own settings are invalid, or ``DEVICE=cuda`` without a GPU.
    """
    settings = settings or Settings()
    # The metrics read the state when scraped (it is built next).
    metrics = Metrics(lambda: state.all_stats(),
                      lambda: {name: m.random_weight_workers()
                               for name, m in state.models.items()},
                      workers_planned=lambda: state.workers_planned(),
                      failed_to_start=lambda: state.failed_to_start())
    models, default = served_models(settings, metrics.refused_by)
    state = state_cls(settings, [m for m, _ in models], default, on_fatal)
    state.telemetry = Telemetry(settings.log_format, tracing.enable())
    core = ServingCore(state, [served for _, served in models], metrics)
    main = state.main
    summary = (f"{main.plan.model_name} ({main.worker_cls.__name__}) behind a "
               "stateful_pool.SPool" if len(models) == 1 else
               f"{len(models)} models ({', '.join(state.models)}), each behind its own "
               "stateful_pool.SPool")
    app = FastAPI(
        title="stateful-pool inference server",
        summary=summary,
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
    if state.telemetry.tracing and not tracing.fastapi_traces_requests():
        app.add_middleware(tracing.TracingMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,
                       known_paths=lambda: known_paths, render_for=render_for,
                       refuse_now=core.refuse_now, reserve=core.reserve,
                       max_bytes=settings.max_upload_bytes, body_timeout=settings.body_timeout_s)
    return app


def served_models(settings: Settings, refused: Callable[[str], None] = lambda reason: None
                  ) -> tuple[list[tuple[ModelState, ServedModel]], str]:
    """Each model's state and its face to the protocols, and the default model's name: those
    of ``MODELS_FILE``, else the one model of the settings. ``refused``: counts a request
    refused, by reason.

    Raises:
        ValueError: a worker class cannot be imported or declares its types wrongly, its
            settings are invalid, a device does not exist (the message names the model).
    """
    if settings.models_file is None:
        worker_cls = load_worker_class(settings.worker_class)
        declaration = declaration_of(worker_cls)
        plan = make_plan(settings, worker_cls)
        state = ModelState(plan.served_name, settings, worker_cls, plan, refused=refused)
        return [(state, ServedModel(plan.served_name, plan.model_name, declaration))], \
            plan.served_name
    entries, default = read_models_file(settings.models_file, settings)
    models = []
    for entry in entries:
        where = f"{settings.models_file}: [models.{entry.name}]"
        try:
            worker_cls = load_worker_class(entry.settings.worker_class)
            declaration = declaration_of(worker_cls)
            options = worker_options(worker_cls, entry.worker_settings, where)
            plan = make_plan(entry.settings, worker_cls, devices=entry.devices,
                             options=options, cpu_threads=entry.cpu_threads)
        except ModelsFileError:
            raise
        except ValueError as exc:
            raise ModelsFileError(f"{where} {exc}") from None
        state = ModelState(entry.name, entry.settings, worker_cls, plan, refused=refused)
        models.append((state, ServedModel(entry.name, plan.model_name, declaration)))
    models.sort(key=lambda pair: pair[0].name != default)
    return models, default
