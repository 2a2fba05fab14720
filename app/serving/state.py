"""What the server knows about its models, their pools and workers, and the lifespan.

One ``ModelState`` per served model: its settings, its plan, its ``SPool`` and what its
workers reported. ``ServerState`` holds them (one per app): the lifespan creates every
model's pool and spawns the planned workers in the background (so the probes answer while
the models load: ``/readyz`` turns 200 when every model has a ready worker) and stops them
when uvicorn has drained the requests. ``ServerState.reload`` replaces one model's workers
while requests flow (``POST /admin/models/{name}/reload``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from pydantic import ValidationError

from stateful_pool import PoolClosedError, PoolStats, SPool, SWorker, WorkerState

from ..settings import Settings
from .errors import LoadShedder, NotReadyError
from .plan import WorkerPlan
from .shell import Telemetry, shell_for

logger = logging.getLogger("app")

READY_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})
# How long ready_pool trusts that a worker was ready.
READY_FOR_S = 0.1
# How long a stop waits for the workers while some are still loading their model.
STOP_LOADING_S = 0.5


class ModelState:
    """One served model: its settings, plan, pool and what its workers reported.

    Attributes:
        name: the name clients call it by.
        settings: the server's settings with the model's own applied (a models file).
        shedder: its admission (``LoadShedder``): each model has its own queue and rate.
        retired: set once a reload has replaced it: no new request takes it.
    """

    def __init__(self, name: str, settings: Settings, worker_cls: type[SWorker[Any, Any]],
                 plan: WorkerPlan, telemetry: Telemetry | None = None,
                 refused: Callable[[str], None] = lambda reason: None) -> None:
        self.name = name
        self.settings = settings
        self.worker_cls = worker_cls
        self.plan = plan
        self.telemetry = telemetry or Telemetry(settings.log_format)
        self.pool: SPool[Any, Any] | None = None
        self.spawn_info: dict[int, dict[str, Any]] = {}
        # Planned workers whose spawn failed while others started: retried in the background
        # with a back-off (worker index -> (why, monotonic time of the next attempt)).
        self.spawn_failures: dict[int, tuple[str, float]] = {}
        self.spawning = True
        self.startup_error: str | None = None
        self.refused = refused
        self.shedder = LoadShedder(self.pool_stats, refused, settings.admission_headroom)
        self.retired = False
        # Log lines name the model when the server has several ("classifier: worker 0 ...").
        self.log_prefix = ""
        # Requests that took this model's pool and have not finished with it: a retired
        # model's pool stops once none is left.
        self.users = 0
        self._no_users = asyncio.Event()
        self._no_users.set()
        self._spawning_task: asyncio.Task[bool] | None = None
        self._retries: asyncio.Future[Any] | None = None
        self._ready_until = 0.0  # ready_pool trusts a ready worker until then

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
        """The pool, if a worker can take a task now; else NotReadyError (503).

        A worker seen ready is trusted for ``READY_FOR_S`` (the pool's snapshot walks its
        queue: under load, taking one per request cost more than the rest of the check); a
        worker that dies meanwhile is respawned and its queued tasks wait for it, as they
        would had it died just after the check.
        """
        pool = self.pool
        now = time.monotonic()
        if pool is not None and now < self._ready_until:
            return pool
        if pool is None or not self.worker_counts()[0]:
            raise NotReadyError(self.not_ready_reason())
        self._ready_until = now + READY_FOR_S
        return pool

    def not_ready_reason(self) -> str:
        if self.startup_error:
            return self.startup_error
        if self.spawning:
            return "the model is loading; retry later"
        return "no model worker is ready (restarting after a crash); retry later"

    def unrecoverable_reason(self) -> str | None:
        """Why this model can never serve again (liveness should fail), or None."""
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
        ready, planned = self.worker_counts()
        return {
            "model": self.plan.model_name,
            "served_model_name": self.plan.served_name,
            "ready": ready > 0,
            "workers_ready": ready,
            "workers_planned": planned,
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

    # ---- requests ---------------------------------------------------------------------------

    def use(self) -> _Use:
        """``with model_state.use():`` around a request's use of the pool, from taking it
        to its last result: a reload retires the old pool once no request uses it."""
        return _Use(self)

    # ---- life -------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the pool and start spawning its workers in the background."""
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
        logger.info("%sstarting %d %s worker(s) for %s on %s", self.log_prefix, len(configs),
                    s.worker_class, self.plan.model_name, ", ".join(c.device for c in configs))
        self._spawning_task = asyncio.create_task(self._spawn_all(self.pool))

    async def started(self) -> bool:
        """Wait for the first spawn of every planned worker; True if at least one started."""
        assert self._spawning_task is not None, "start() first"
        return await asyncio.shield(self._spawning_task)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the workers: tasks still queued are dropped, running ones may finish within
        ``timeout`` (default SHUTDOWN_TIMEOUT_S); a worker still loading is not waited for."""
        for task in (self._spawning_task, self._retries):
            if task is not None:
                task.cancel()
        if self.pool is None:
            return
        if timeout is None:
            timeout = STOP_LOADING_S if self.spawning else self.settings.shutdown_timeout_s
        await asyncio.get_running_loop().run_in_executor(None, partial(
            self.pool.shutdown, wait=True, cancel_futures=True, timeout=timeout))

    async def retire(self) -> None:
        """Stop once the requests that took this model's pool have finished with it."""
        self.retired = True
        limit = self.settings.stream_timeout_s + self.settings.shutdown_timeout_s
        try:
            await asyncio.wait_for(self._no_users.wait(), limit)
        except TimeoutError:
            logger.warning("%s%d request(s) still use the replaced workers after %g s; "
                           "stopping them", self.log_prefix, self.users, limit)
        await self.stop(self.settings.shutdown_timeout_s)

    async def _spawn_all(self, pool: SPool[Any, Any]) -> bool:
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
            self.startup_error = f"no model worker could start ({self.name}): " + "; ".join(
                f"worker {config.worker_index}: {self.spawn_failures[config.worker_index][0]}"
                for config in failed)
            self.spawn_failures.clear()
            return False
        if failed:
            # Some workers serve: the others are tried again, as a crashed worker would be
            # respawned, with a back-off that grows to RESTART_BACKOFF_MAX_S (a GPU that was
            # busy or short of memory at start-up may be free later).
            self._retries = asyncio.gather(*(self._retry_spawn(pool, config)
                                             for config in failed))
        return True

    def _note_spawn(self, config: Any, outcome: Any) -> bool:
        """Record what one spawn gave; False if it failed."""
        index = config.worker_index
        if isinstance(outcome, BaseException):
            why = f"{type(outcome).__name__}: {outcome}"
            self.spawn_failures[index] = (why, time.monotonic())
            logger.error("%sworker %d failed to start", self.log_prefix, index, exc_info=outcome)
            return False
        self.spawn_failures.pop(index, None)
        self.spawn_info[index] = outcome if isinstance(outcome, dict) else {
            "spawn_result": repr(outcome)}
        logger.info("%sworker %d ready%s", self.log_prefix, index,
                    ready_details(self.spawn_info[index]))
        return True

    async def _retry_spawn(self, pool: SPool[Any, Any], config: Any) -> None:
        """Start one planned worker that failed to, until it does or the server stops."""
        s = self.settings
        delay = s.restart_backoff_s
        while True:
            why, _ = self.spawn_failures[config.worker_index]
            self.spawn_failures[config.worker_index] = (why, time.monotonic() + delay)
            logger.warning("%sworker %d: next start attempt in %.0f s", self.log_prefix,
                           config.worker_index, delay)
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


class _Use:
    __slots__ = ("model",)

    def __init__(self, model: ModelState) -> None:
        self.model = model

    def __enter__(self) -> None:
        model = self.model
        model.users += 1
        if model.users == 1:
            model._no_users.clear()

    def __exit__(self, *exc_info: object) -> None:
        model = self.model
        model.users -= 1
        if not model.users:
            model._no_users.set()


class ReloadError(Exception):
    """A reload that could not happen; ``status``: 404, 409 or 500 (its new workers failed
    to start: the old ones serve on)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServerState:
    """Every served model's state, and the server's lifespan; one per app.

    Attributes:
        models: the served models by name, the default one first; a reload replaces an
            entry (a request looks its model up once, when it starts).
        default: the name of the model ``/predict`` serves.
    """

    def __init__(self, settings: Settings, models: Sequence[ModelState], default: str,
                 on_fatal: Callable[[], None] | None) -> None:
        self.settings = settings
        self.models: dict[str, ModelState] = {m.name: m for m in models}
        if len(self.models) > 1:
            for model in models:
                model.log_prefix = f"{model.name}: "
        self.default = default
        self.on_fatal = on_fatal
        self.reloading: set[str] = set()
        # Models whose new workers are starting (a reload), stopped if the server stops.
        self._replacing: dict[str, ModelState] = {}
        # Replaced models whose old workers finish their requests (retire task -> model).
        self._retiring: dict[asyncio.Task[None], ModelState] = {}

    # The default model, for a server of one (and the code written for it).
    @property
    def main(self) -> ModelState:
        return self.models[self.default]

    @property
    def pool(self) -> SPool[Any, Any] | None:
        return self.main.pool

    @property
    def worker_cls(self) -> type[SWorker[Any, Any]]:
        return self.main.worker_cls

    @property
    def telemetry(self) -> Telemetry:
        return self.main.telemetry

    @telemetry.setter
    def telemetry(self, value: Telemetry) -> None:
        for model in self.models.values():
            model.telemetry = value

    def all_stats(self) -> dict[str, PoolStats | None]:
        return {name: m.pool_stats() for name, m in self.models.items()}

    def worker_counts(self) -> tuple[int, int]:
        """(workers ready to take a task now, workers planned), over every model."""
        counts = [m.worker_counts() for m in self.models.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def workers_planned(self) -> int:
        return sum(len(m.plan.configs) for m in self.models.values())

    def failed_to_start(self) -> int:
        return sum(len(m.spawn_failures) for m in self.models.values())

    def _labelled(self, reasons: list[tuple[str, str]]) -> str:
        if len(self.models) == 1:
            return "; ".join(reason for _, reason in reasons)
        return "; ".join(f"model {name!r}: {reason}" for name, reason in reasons)

    def not_ready(self) -> str | None:
        """Why some model has no worker ready (readiness fails), or None."""
        reasons = [(m.name, m.not_ready_reason()) for m in self.models.values()
                   if not m.worker_counts()[0]]
        return self._labelled(reasons) if reasons else None

    def degraded_reason(self) -> str | None:
        reasons = [(m.name, why) for m in self.models.values()
                   if (why := m.degraded_reason()) is not None]
        return self._labelled(reasons) if reasons else None

    def unrecoverable_reason(self) -> str | None:
        """Why the server can never serve one of its models again (liveness fails), or None."""
        reasons = [(m.name, why) for m in self.models.values()
                   if (why := m.unrecoverable_reason()) is not None]
        return self._labelled(reasons) if reasons else None

    def weights_summary(self) -> dict[str, Any]:
        return self.main.weights_summary()

    def model_info(self) -> dict[str, Any]:
        return self.main.model_info()

    # ---- the lifespan -----------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        for model in self.models.values():
            model.start()
        watch = asyncio.create_task(self._watch_startup())
        try:
            yield
        finally:
            watch.cancel()
            logger.info("stopping the workers")
            # uvicorn has drained the HTTP requests by now: a task still queued belongs to a
            # request that is gone, so it is dropped; running ones may finish, bounded. A
            # worker still loading its model is not waited for: nothing needs it any more.
            for task in self._retiring:
                task.cancel()
            await asyncio.gather(*(m.stop() for m in self.models.values()),
                                 *(m.stop() for m in self._retiring.values()),
                                 *(m.stop(STOP_LOADING_S) for m in self._replacing.values()))
            logger.info("workers stopped")

    async def _watch_startup(self) -> None:
        """A model none of whose workers could start makes the server unable to serve."""
        models = list(self.models.values())
        outcomes = await asyncio.gather(*(m.started() for m in models))
        failed = [m for m, ok in zip(models, outcomes, strict=True) if not ok]
        if failed:
            for model in failed:
                logger.critical("%s", model.startup_error)
            if self.on_fatal is not None:
                self.on_fatal()

    # ---- reload -----------------------------------------------------------------------------

    async def reload(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Replace a model's workers while requests flow.

        New workers spawn and warm up beside the old ones; once all of them have started,
        new requests go to them, while the requests that took the old pool finish there;
        the old workers stop when the last of those has its answer. No request fails
        because of the swap. The old workers serve on if the new ones cannot start (out of
        GPU memory, say): both copies must fit during the swap.

        Args:
            changes: ``model_name``, ``weights`` (``MODEL_WEIGHTS``) and ``settings`` (the
                worker's own) to load instead; the rest is kept.

        Raises:
            ReloadError: 404 unknown model, 409 a reload or the start-up is under way,
                500 the new workers could not start.
        """
        from .models_file import worker_options
        from .plan import make_plan

        old = self.models.get(name)
        if old is None:
            raise ReloadError(404, f"unknown model {name!r}; this server serves "
                                   f"{', '.join(map(repr, self.models))}")
        if name in self.reloading:
            raise ReloadError(409, f"model {name!r} is being reloaded already")
        if old.spawning:
            raise ReloadError(409, f"model {name!r} is still starting; reload it once ready")
        self.reloading.add(name)
        try:
            update = {"served_model_name": name}
            if changes.get("model_name") is not None:
                update["model_name"] = changes["model_name"]
            if changes.get("weights") is not None:
                update["model_weights"] = changes["weights"]
            try:
                settings = Settings.model_validate({**old.settings.model_dump(), **update})
                options = old.plan.options
                if changes.get("settings") is not None:
                    options = worker_options(old.worker_cls, {
                        **({} if options is None else options.model_dump()),
                        **changes["settings"]}, f"model {name!r}")
                # The same places as the old workers (Ray places its actors itself).
                ray = settings.pool_backend == "ray"
                plan = make_plan(
                    settings, old.worker_cls, options=options,
                    devices=None if ray else [c.device for c in old.plan.configs],
                    cpu_threads=None if ray else old.plan.configs[0].num_threads)
            except (ValidationError, ValueError) as exc:
                raise ReloadError(422, f"cannot reload model {name!r}: {exc}") from None
            new = ModelState(name, settings, old.worker_cls, plan, old.telemetry, old.refused)
            new.log_prefix = old.log_prefix
            began = time.monotonic()
            self._replacing[name] = new
            try:
                new.start()
                started = await new.started()
            finally:
                self._replacing.pop(name, None)
            if not started or new.spawn_failures:
                why = new.startup_error or "; ".join(
                    f"worker {i}: {why}" for i, (why, _) in sorted(new.spawn_failures.items()))
                await new.stop(STOP_LOADING_S)
                raise ReloadError(500, f"model {name!r} was not reloaded: its new workers "
                                       f"could not start ({why}); the old ones serve on")
            self.models[name] = new  # from here, new requests take the new pool
            seconds = time.monotonic() - began
            logger.info("%s: reloaded (%s, weights %s) in %.1f s; the old workers retire once "
                        "their %d request(s) are answered", name, plan.model_name,
                        settings.model_weights, seconds, old.users)
            task = asyncio.create_task(old.retire())
            self._retiring[task] = old
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
            return {"model": name, "model_name": plan.model_name,
                    "weights": settings.model_weights, "workers": len(plan.configs),
                    "seconds": round(seconds, 3), "retiring_requests": old.users}
        finally:
            self.reloading.discard(name)


def ready_details(info: dict[str, Any]) -> str:
    """``: pid 12 on cuda:0, weights pretrained (hub)`` from what ``spawn`` returned: only
    the keys it has, so a worker that reports other things gets no ``None`` in its line."""
    where = " ".join(f"{label}{info[key]}" for key, label in (("pid", "pid "), ("device", "on "))
                     if info.get(key) is not None)
    weights = "" if info.get("weights") is None else f"weights {info['weights']}" + (
        f" ({info['weights_source']})" if info.get("weights_source") is not None else "")
    details = ", ".join(part for part in (where, weights) if part)
    return f": {details}" if details else ""
