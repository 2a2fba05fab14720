"""The application factory. The lifespan owns one ``SPool``; its workers hold the model.

One uvicorn process, one pool: parallelism comes from the pool's worker processes (one per
GPU), never from uvicorn workers, each of which would load its own copy of the model.
Workers are spawned in the background so the probes answer while the model loads:
``/readyz`` turns 200 when the first worker is ready.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI

from stateful_pool import PoolStats, SPool, SWorker

from .contract import WorkerConfig
from .errors import NotReadyError, install_error_handlers
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, RequestContextMiddleware
from .routes import build_router
from .settings import Settings, available_cpus, cpu_workers

logger = logging.getLogger("app")

READY_STATES = frozenset({"idle", "busy"})


def load_worker_class(spec: str) -> type[SWorker[Any, Any]]:
    """Import ``package.module:Class`` and check it is an ``SWorker``."""
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"WORKER_CLASS={spec!r} cannot be imported: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, SWorker)):
        raise ValueError(f"WORKER_CLASS={spec!r} is not a subclass of stateful_pool.SWorker")
    return obj


def plan_workers(settings: Settings) -> list[WorkerConfig]:
    """One worker per visible GPU (or NUM_WORKERS, round-robin over the GPUs); without a
    GPU, CPU workers that split the cores between them. With POOL_BACKEND=ray, one worker per
    GPU of the whole Ray cluster (see app/cluster.py)."""
    if settings.pool_backend == "ray":
        return _plan_ray(settings)[0]
    gpus = 0
    if settings.device in ("auto", "cuda"):
        import torch  # only to count GPUs: DEVICE=cpu serves without importing it here

        gpus = torch.cuda.device_count()
        if settings.device == "cuda" and gpus == 0:
            raise ValueError("DEVICE=cuda but no CUDA device is visible")
    cpus = available_cpus()
    count = settings.num_workers or gpus or cpu_workers(cpus)
    return [
        WorkerConfig(
            worker_index=index,
            model_name=settings.model_name,
            weights=settings.model_weights,
            device=f"cuda:{index % gpus}" if gpus else "cpu",
            precision=settings.precision,
            num_threads=max(1, cpus // count),
            max_image_pixels=settings.max_image_pixels,
            log_level=settings.log_level,
        )
        for index in range(count)
    ]


def _plan_ray(settings: Settings) -> tuple[list[WorkerConfig], dict[str, Any]]:
    from . import cluster

    resources = cluster.connect(settings.ray_address)
    count, on_gpu, options = cluster.plan(resources, device=settings.device,
                                          num_workers=settings.num_workers)
    configs = [
        WorkerConfig(
            worker_index=index,
            model_name=settings.model_name,
            weights=settings.model_weights,
            device="cuda:0" if on_gpu else "cpu",  # Ray narrows CUDA_VISIBLE_DEVICES per actor
            precision=settings.precision,
            num_threads=int(options.get("num_cpus", 1)),
            max_image_pixels=settings.max_image_pixels,
            log_level=settings.log_level,
        )
        for index in range(count)
    ]
    return configs, options


def pool_backend_options(settings: Settings) -> dict[str, Any]:
    """The SPool keywords that choose where workers run."""
    if settings.pool_backend == "ray":
        return {"backend": "ray", "worker_options": _plan_ray(settings)[1]}
    return {}


class ServerState:
    """The pool and what the server knows about its workers; one per app."""

    def __init__(self, settings: Settings, worker_cls: type[SWorker[Any, Any]],
                 plan: list[WorkerConfig], on_fatal: Callable[[], None] | None) -> None:
        self.settings = settings
        self.worker_cls = worker_cls
        self.plan = plan
        self.on_fatal = on_fatal
        self.pool: SPool[Any, Any] | None = None
        self.spawn_info: dict[int, dict[str, Any]] = {}
        self.spawning = True
        self.startup_error: str | None = None

    def pool_stats(self) -> PoolStats | None:
        return None if self.pool is None else self.pool.stats()

    def worker_counts(self) -> tuple[int, int]:
        """(workers ready to take a task now, workers planned)."""
        stats = self.pool_stats()
        ready = 0 if stats is None else sum(w.state in READY_STATES for w in stats.workers)
        return ready, len(self.plan)

    def ready_pool(self) -> SPool[Any, Any]:
        """The pool, if a worker can take a task now; else NotReadyError (503)."""
        if self.pool is None or not self.worker_counts()[0]:
            raise NotReadyError(self.not_ready_reason())
        return self.pool

    def not_ready_reason(self) -> str:
        if self.startup_error:
            return self.startup_error
        if self.spawning:
            return "the model is loading; retry later"
        return "no model worker is ready (restarting after a crash); retry later"

    def unrecoverable_reason(self) -> str | None:
        """Why the server can never serve again (liveness should fail), or None."""
        if self.startup_error:
            return self.startup_error
        stats = self.pool_stats()
        if not self.spawning and stats is not None and stats.live_workers == 0:
            return "every model worker is dead and out of restarts"
        return None

    def model_info(self) -> dict[str, Any]:
        s = self.settings
        stats = self.pool_stats()
        workers = [] if stats is None else [
            {**self.spawn_info.get(w.worker_id, {}), "worker_id": w.worker_id, "pid": w.pid,
             "state": w.state, "restarts": w.restarts, "tasks_done": w.tasks_done,
             "host": w.host, "node": w.node, "gpu_ids": list(w.gpu_ids)}
            for w in stats.workers]
        return {
            "model": s.model_name,
            "weights": s.model_weights,
            "worker_class": s.worker_class,
            "backend": s.pool_backend,
            "device": ", ".join(sorted({c.device for c in self.plan})),
            "precision": s.precision,
            "batching": {"max_batch_size": s.max_batch_size,
                         "max_batch_wait_ms": s.max_batch_wait_ms},
            "queue_size": s.queue_size,
            "request_timeout_s": s.request_timeout_s,
            "workers": workers,
        }

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        s = self.settings
        self.pool = SPool(
            self.worker_cls,
            queue_size=s.queue_size,
            submission_timeout=0,  # a full queue answers 503 at once rather than piling up
            execution_timeout=s.request_timeout_s,
            max_batch_size=s.max_batch_size,
            max_batch_wait=s.max_batch_wait_ms / 1000,
            **pool_backend_options(s),
        )
        logger.info("starting %d %s worker(s) for %s on %s", len(self.plan),
                    s.worker_class, s.model_name, ", ".join(c.device for c in self.plan))
        spawning = asyncio.create_task(self._spawn_all(self.pool))
        try:
            yield
        finally:
            spawning.cancel()
            logger.info("stopping the workers")
            # uvicorn has drained the HTTP requests by now: a task still queued belongs to a
            # request that is gone, so it is dropped; running ones may finish, bounded.
            await asyncio.get_running_loop().run_in_executor(None, partial(
                self.pool.shutdown, wait=True, cancel_futures=True,
                timeout=s.shutdown_timeout_s))
            logger.info("workers stopped")

    async def _spawn_all(self, pool: SPool[Any, Any]) -> None:
        outcomes = await asyncio.gather(
            *(pool.async_spawn(config) for config in self.plan), return_exceptions=True)
        failures = []
        for config, outcome in zip(self.plan, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures.append(f"worker {config.worker_index}: {type(outcome).__name__}: "
                                f"{outcome}")
                logger.error("worker %d failed to start", config.worker_index,
                             exc_info=outcome)
            else:
                self.spawn_info[config.worker_index] = outcome if isinstance(
                    outcome, dict) else {"spawn_result": repr(outcome)}
                info = self.spawn_info[config.worker_index]
                logger.info("worker %d ready: pid %s on %s, weights %s (%s)",
                            config.worker_index, info.get("pid"), info.get("device"),
                            info.get("weights"), info.get("weights_source"))
        self.spawning = False
        if len(failures) == len(self.plan):
            self.startup_error = "no model worker could start: " + "; ".join(failures)
            logger.critical(self.startup_error)
            if self.on_fatal is not None:
                self.on_fatal()


def create_app(settings: Settings | None = None, *,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the server.

    Args:
        settings: the configuration; default read from the environment.
        on_fatal: called when no worker could start (``python -m app`` exits with 1);
            without it the server stays up, unready, and ``/healthz`` answers 503.

    Raises:
        ValueError: ``WORKER_CLASS`` cannot be imported, or ``DEVICE=cuda`` without a GPU.
    """
    settings = settings or Settings()
    worker_cls = load_worker_class(settings.worker_class)
    state = ServerState(settings, worker_cls, plan_workers(settings), on_fatal)
    metrics = Metrics(state.pool_stats)
    app = FastAPI(
        title="stateful-pool inference server",
        summary=f"{settings.model_name} behind a stateful_pool.SPool",
        lifespan=state.lifespan,
    )
    app.state.server = state
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(build_router(getattr(worker_cls, "output_model", None),
                                    auth=settings.api_key is not None))
    install_error_handlers(app)
    known_paths = {getattr(route, "path", "") for route in app.routes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,
                       known_paths=lambda: known_paths)
    return app
