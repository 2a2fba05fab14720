"""``ServerState``: the pool, what the server knows about its workers, and the lifespan.

One per app. The lifespan creates the ``SPool``, spawns the planned workers in the
background (so the probes answer while the model loads: ``/readyz`` turns 200 when the
first worker is ready) and stops them when uvicorn has drained the requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from stateful_pool import PoolStats, SPool, SWorker, WorkerState

from ..settings import Settings
from .errors import NotReadyError
from .plan import WorkerPlan
from .shell import Telemetry, shell_for

logger = logging.getLogger("app")

READY_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})
# How long a stop waits for the workers while some are still loading their model.
STOP_LOADING_S = 0.5


class ServerState:
    """The pool and what the server knows about its workers; one per app."""

    def __init__(self, settings: Settings, worker_cls: type[SWorker[Any, Any]],
                 plan: WorkerPlan, on_fatal: Callable[[], None] | None) -> None:
        self.settings = settings
        self.worker_cls = worker_cls
        self.plan = plan
        self.on_fatal = on_fatal
        self.pool: SPool[Any, Any] | None = None
        self.spawn_info: dict[int, dict[str, Any]] = {}
        self.spawning = True
        self.startup_error: str | None = None
        self.telemetry = Telemetry(settings.log_format)

    def pool_stats(self) -> PoolStats | None:
        return None if self.pool is None else self.pool.stats()

    def worker_counts(self) -> tuple[int, int]:
        """(workers ready to take a task now, workers planned)."""
        stats = self.pool_stats()
        ready = 0 if stats is None else sum(w.state in READY_STATES for w in stats.workers)
        return ready, len(self.plan.configs)

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

    def random_weight_workers(self) -> list[int]:
        """Indices of the started workers that report random weights (``weights: random``)."""
        return sorted(i for i, info in self.spawn_info.items() if info.get("weights") == "random")

    def weights_summary(self) -> dict[str, Any]:
        """What the workers loaded, for ``/readyz``, ``/v1/model`` and the v2 metadata."""
        loaded = sorted({str(info.get("weights")) for info in self.spawn_info.values()
                         if info.get("weights") is not None})
        return {"weights": ",".join(loaded) or self.settings.model_weights,
                "random_weights": bool(self.random_weight_workers())}

    def model_info(self) -> dict[str, Any]:
        s = self.settings
        stats = self.pool_stats()
        workers = [] if stats is None else [
            {**self.spawn_info.get(w.worker_id, {}), "worker_id": w.worker_id, "pid": w.pid,
             "state": w.state, "restarts": w.restarts, "tasks_done": w.tasks_done,
             "host": w.host, "node": w.node, "gpu_ids": list(w.gpu_ids)}
            for w in stats.workers]
        options = self.plan.options
        return {
            "model": self.plan.model_name,
            "served_model_name": self.plan.served_name,
            "weights": s.model_weights,
            "random_weights": bool(self.random_weight_workers()),
            "worker_class": s.worker_class,
            "worker_settings": None if options is None else options.model_dump(mode="json"),
            "backend": s.pool_backend,
            "device": ", ".join(sorted({c.device for c in self.plan.configs})),
            "precision": s.precision,
            "batching": {"max_batch_size": s.max_batch_size,
                         "max_batch_wait_ms": s.max_batch_wait_ms},
            "queue_size": s.queue_size,
            "request_timeout_s": s.request_timeout_s,
            "workers": workers,
        }

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        s = self.settings
        configs = self.plan.configs
        self.pool = SPool(
            shell_for(self.worker_cls),
            queue_size=s.queue_size,
            submission_timeout=0,  # a full queue answers 503 at once rather than piling up
            execution_timeout=s.request_timeout_s,
            # A hung model (a deadlock, a stuck GPU) would keep its worker busy for good while
            # the probes said ready: every request 504. Killed, it is respawned.
            hang_timeout=s.hang_timeout,
            max_batch_size=s.max_batch_size,
            max_batch_wait=s.max_batch_wait_ms / 1000,
            **self.plan.pool_options,
        )
        logger.info("starting %d %s worker(s) for %s on %s", len(configs), s.worker_class,
                    self.plan.model_name, ", ".join(c.device for c in configs))
        spawning = asyncio.create_task(self._spawn_all(self.pool))
        try:
            yield
        finally:
            spawning.cancel()
            logger.info("stopping the workers")
            # uvicorn has drained the HTTP requests by now: a task still queued belongs to a
            # request that is gone, so it is dropped; running ones may finish, bounded. A
            # worker still loading its model is not waited for: nothing needs it any more.
            timeout = STOP_LOADING_S if self.spawning else s.shutdown_timeout_s
            await asyncio.get_running_loop().run_in_executor(None, partial(
                self.pool.shutdown, wait=True, cancel_futures=True, timeout=timeout))
            logger.info("workers stopped")

    async def _spawn_all(self, pool: SPool[Any, Any]) -> None:
        configs = self.plan.configs
        outcomes = await asyncio.gather(
            *(pool.async_spawn(self.worker_cls, config, self.telemetry)
              for config in configs), return_exceptions=True)
        failures = []
        for config, outcome in zip(configs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures.append(f"worker {config.worker_index}: {type(outcome).__name__}: "
                                f"{outcome}")
                logger.error("worker %d failed to start", config.worker_index,
                             exc_info=outcome)
            else:
                self.spawn_info[config.worker_index] = outcome if isinstance(
                    outcome, dict) else {"spawn_result": repr(outcome)}
                logger.info("worker %d ready%s", config.worker_index,
                            ready_details(self.spawn_info[config.worker_index]))
        self.spawning = False
        if len(failures) == len(configs):
            self.startup_error = "no model worker could start: " + "; ".join(failures)
            logger.critical(self.startup_error)
            if self.on_fatal is not None:
                self.on_fatal()


def ready_details(info: dict[str, Any]) -> str:
    """``: pid 12 on cuda:0, weights pretrained (hub)`` from what ``spawn`` returned: only
    the keys it has, so a worker that reports other things gets no ``None`` in its line."""
    where = " ".join(f"{label}{info[key]}" for key, label in (("pid", "pid "), ("device", "on "))
                     if info.get(key) is not None)
    weights = "" if info.get("weights") is None else f"weights {info['weights']}" + (
        f" ({info['weights_source']})" if info.get("weights_source") is not None else "")
    details = ", ".join(part for part in (where, weights) if part)
    return f": {details}" if details else ""
