"""``ServerState``: the pool, what the server knows about its workers, and the lifespan.

One per app. The lifespan creates the ``SPool``, spawns the planned workers in the
background (so the probes answer while the model loads: ``/readyz`` turns 200 when the
first worker is ready) and stops them when uvicorn has drained the requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from stateful_pool import PoolClosedError, PoolStats, SPool, SWorker, WorkerState

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
        # Planned workers whose spawn failed while others started: retried in the background
        # with a back-off (worker index -> (why, monotonic time of the next attempt)).
        self.spawn_failures: dict[int, tuple[str, float]] = {}
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

    def degraded_reason(self) -> str | None:
        """Why fewer workers serve than planned (some restarting, backing off after a crash
        loop, or failing to start), or None when all of them serve."""
        ready, planned = self.worker_counts()
        if ready >= planned or self.spawning:
            return None
        stats = self.pool_stats()
        down = [f"worker {w.worker_id} {w.state.value.replace('_', ' ')}"
                + (f" (next try in {w.restart_in:.0f} s)" if w.restart_in is not None else "")
                + (f": {w.last_failure}" if w.last_failure else "")
                for w in (stats.workers if stats is not None else ())
                if w.state not in READY_STATES]
        now = time.monotonic()
        down += [f"worker {index} failed to start (next try in {max(0.0, at - now):.0f} s): "
                 f"{why}" for index, (why, at) in sorted(self.spawn_failures.items())]
        return f"{ready} of {planned} workers serve; " + "; ".join(down)

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
             "restart_in_s": w.restart_in, "last_failure": w.last_failure,
             "host": w.host, "node": w.node, "gpu_ids": list(w.gpu_ids)}
            for w in stats.workers]
        now = time.monotonic()
        workers += [{"worker_id": None, "worker_index": index, "pid": None,
                     "state": "failed_to_start", "restarts": 0, "tasks_done": 0,
                     "restart_in_s": max(0.0, at - now), "last_failure": why}
                    for index, (why, at) in sorted(self.spawn_failures.items())]
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
            # A crash loop slows the respawns down; it never leaves a slot empty for good.
            crash_loop_backoff=s.restart_backoff_s,
            crash_loop_max_delay=s.restart_backoff_max_s,
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
        failed = []
        for config, outcome in zip(configs, outcomes, strict=True):
            if not self._note_spawn(config, outcome):
                failed.append(config)
        self.spawning = False
        if len(failed) == len(configs):
            self.startup_error = "no model worker could start: " + "; ".join(
                f"worker {config.worker_index}: {self.spawn_failures[config.worker_index][0]}"
                for config in failed)
            self.spawn_failures.clear()
            logger.critical(self.startup_error)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        # Some workers serve: the others are tried again, as a crashed worker would be
        # respawned, with a back-off that grows to RESTART_BACKOFF_MAX_S (a GPU that was
        # busy or short of memory at start-up may be free later).
        await asyncio.gather(*(self._retry_spawn(pool, config) for config in failed))

    def _note_spawn(self, config: Any, outcome: Any) -> bool:
        """Record what one spawn gave; False if it failed."""
        index = config.worker_index
        if isinstance(outcome, BaseException):
            why = f"{type(outcome).__name__}: {outcome}"
            self.spawn_failures[index] = (why, time.monotonic())
            logger.error("worker %d failed to start", index, exc_info=outcome)
            return False
        self.spawn_failures.pop(index, None)
        self.spawn_info[index] = outcome if isinstance(outcome, dict) else {
            "spawn_result": repr(outcome)}
        logger.info("worker %d ready%s", index, ready_details(self.spawn_info[index]))
        return True

    async def _retry_spawn(self, pool: SPool[Any, Any], config: Any) -> None:
        """Start one planned worker that failed to, until it does or the server stops."""
        s = self.settings
        delay = s.restart_backoff_s
        while True:
            why, _ = self.spawn_failures[config.worker_index]
            self.spawn_failures[config.worker_index] = (why, time.monotonic() + delay)
            logger.warning("worker %d: next start attempt in %.0f s", config.worker_index,
                           delay)
            await asyncio.sleep(delay)
            try:
                outcome = await pool.async_spawn(self.worker_cls, config, self.telemetry)
            except PoolClosedError:
                return  # the server is stopping
            except Exception as exc:
                outcome = exc
            if self._note_spawn(config, outcome):
                return
            delay = min(2 * delay, s.restart_backoff_max_s)


def ready_details(info: dict[str, Any]) -> str:
    """``: pid 12 on cuda:0, weights pretrained (hub)`` from what ``spawn`` returned: only
    the keys it has, so a worker that reports other things gets no ``None`` in its line."""
    where = " ".join(f"{label}{info[key]}" for key, label in (("pid", "pid "), ("device", "on "))
                     if info.get(key) is not None)
    weights = "" if info.get("weights") is None else f"weights {info['weights']}" + (
        f" ({info['weights_source']})" if info.get("weights_source") is not None else "")
    details = ", ".join(part for part in (where, weights) if part)
    return f": {details}" if details else ""
