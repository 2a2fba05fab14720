"""``API_PROCESSES=N``: N uvicorn processes on one port in front of one machine's workers.

One uvicorn process spends about a core on HTTP, validation and JSON for a few thousand small
requests per second: on a machine with many GPUs it cannot feed them all. With
``API_PROCESSES=N`` the process started by ``python -m app`` becomes a supervisor:

* it owns the pool (``ServerState``: spawning, healing, back-off, shutdown: the same code as
  a single-process server) and serves it to the API processes with
  ``stateful_pool.PoolServer`` on a Unix socket in a private directory (mode 0700, a random
  auth key in a 0600 file, the peer's uid checked);
* it binds HOST:PORT once and starts N API processes that inherit the listening socket
  (uvicorn's own multi-process mode does the same): the kernel hands each new connection to
  whichever process accepts it first;
* each API process builds the usual app against a ``stateful_pool.RemotePool``: every
  request of every process goes to the one pool, so a GPU's requests still meet in one batch
  and no GPU idles while another has a queue, however the kernel spread the connections;
* it restarts an API process that dies (its requests in flight are lost; the others serve
  on); SIGTERM or SIGINT: the listening socket is closed, the API processes drain their HTTP
  requests (``SHUTDOWN_TIMEOUT_S``), then the workers stop. Exit codes as for one process.

Readiness, ``/healthz`` and ``/v1/model`` in every API process read the owner's pool (its
stats pushed every 0.1 s) and what it knows of its workers. ``/metrics``: the HTTP counters
and histograms are merged across the API processes (prometheus_client's multi-process mode,
one file per process in the private directory), the pool's figures are the one pool's, and
the gauges of the HTTP side (``http_requests_in_progress``) and the ``process_*`` metrics are
those of the API process that answered the scrape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from stateful_pool import PoolClient, PoolServer

from ..settings import Settings
from .state import ModelState, ReloadError, ServerState

logger = logging.getLogger("app")

API_PROCESSES_ENV = "API_PROCESSES"
# What the supervisor tells each API process (environment variables).
LISTEN_FD_ENV = "SPOOL_LISTEN_FD"
POOL_SOCKET_ENV = "SPOOL_POOL_SOCKET"
POOL_KEY_FILE_ENV = "SPOOL_POOL_KEY_FILE"
PROCESS_INDEX_ENV = "SPOOL_API_PROCESS"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds between two looks at the API processes (restart a dead one).
WATCH_INTERVAL_S = 0.2
# An API process that dies sooner than this after its start is restarted after a delay that
# doubles up to RESTART_MAX_DELAY_S (a crash loop must not spin a core).
STABLE_AFTER_S = 10.0
RESTART_MAX_DELAY_S = 10.0
# How long the supervisor waits for the API processes to drain past SHUTDOWN_TIMEOUT_S.
DRAIN_MARGIN_S = 5.0
MAX_API_PROCESSES = 256


def api_processes(settings: Settings) -> int:
    """``API_PROCESSES`` (default 1): a setting when ``Settings`` has it, else read here.

    Raises:
        ValueError: not an integer in 1..256.
    """
    value = getattr(settings, "api_processes", None)
    if value is None:
        raw = os.environ.get(API_PROCESSES_ENV, "").strip() or "1"
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{API_PROCESSES_ENV} must be an integer, got {raw!r}") from None
    if not 1 <= value <= MAX_API_PROCESSES:
        raise ValueError(f"{API_PROCESSES_ENV} must be 1..{MAX_API_PROCESSES}, got {value}")
    return int(value)


# ---- the owner's side: what the API processes mirror -----------------------------------------


def owner_view(model: ModelState) -> dict[str, Any]:
    """What an API process needs of the owner's ``ModelState`` besides the pool's stats
    (pushed with them by the pool server)."""
    return {"spawn_info": dict(model.spawn_info), "spawn_failures": dict(model.spawn_failures),
            "spawning": model.spawning, "startup_error": model.startup_error}


class RemoteServerState(ServerState):
    """An API process's ``ServerState``: each model's pool is the owner's, reached through
    one ``PoolClient``; what the owner knows of its workers is mirrored from it."""

    def __init__(self, settings: Settings, models: Sequence[ModelState], default: str,
                 on_fatal: Callable[[], None] | None) -> None:
        super().__init__(settings, models, default, on_fatal)
        self.client: PoolClient | None = None
        self.on_owner_lost: Callable[[], None] | None = None

    def _mirror(self) -> None:
        views = None if self.client is None else self.client.info
        if not isinstance(views, dict):
            return
        for name, model in self.models.items():
            view = views.get(name)
            if isinstance(view, dict):
                model.spawn_info = view["spawn_info"]
                model.spawn_failures = view["spawn_failures"]
                model.spawning = view["spawning"]
                model.startup_error = view["startup_error"]

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        self.client = await PoolClient.connect_async(
            os.environ[POOL_SOCKET_ENV], Path(os.environ[POOL_KEY_FILE_ENV]).read_bytes(),
            reconnect_interval=None, on_lost=self._owner_lost)
        # Each model's pool is served under its name: the owner read the same settings.
        for name, model in self.models.items():
            model.pool = self.client.pool(name)  # type: ignore[assignment]
        self._mirror()

        async def mirror() -> None:
            while True:
                await asyncio.sleep(0.1)
                self._mirror()

        mirroring = asyncio.create_task(mirror())
        try:
            yield
        finally:
            mirroring.cancel()
            self.client.close()

    async def reload(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        raise ReloadError(409, "a model cannot be reloaded while API_PROCESSES > 1: the "
                               "process that owns the workers does not take HTTP requests; "
                               "restart the server (a rolling restart behind a load balancer)")

    def _owner_lost(self) -> None:
        logger.critical("the supervisor's pool server is gone; this API process stops")
        if self.on_owner_lost is not None:
            self.on_owner_lost()


# ---- an API process ---------------------------------------------------------------------------


def merged_metrics(metrics: Any, directory: str) -> None:
    """``/metrics`` of this API process shows the HTTP figures of every API process: those
    kept in files (counters, histograms) merged by prometheus_client, the others (the pool's,
    this process's) as this process has them."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    local = metrics.registry
    shared = CollectorRegistry()
    files = MultiProcessCollector(shared, path=directory)  # type: ignore[no-untyped-call]

    class Merged(Collector):
        def collect(self) -> Iterator[Any]:
            merged = [metric for metric in files.collect()  # type: ignore[no-untyped-call]
                      if metric.type in ("counter", "histogram")]
            names = {metric.name for metric in merged}
            yield from merged
            for metric in local.collect():
                if metric.name not in names:
                    yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    metrics.registry = registry


def api_process() -> None:
    """The entry of one API process (started by the supervisor): the app on the inherited
    listening socket, against the owner's pool."""
    from ..__main__ import exit_now, uvicorn_server
    from ..main import create_app
    from ..ops.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    listener = socket.socket(fileno=int(os.environ[LISTEN_FD_ENV]))
    app = create_app(settings, state_cls=RemoteServerState)
    merged_metrics(app.state.metrics, os.environ[METRICS_DIR_ENV])
    server = uvicorn_server(app, settings)
    owner_lost = False

    def stop() -> None:
        nonlocal owner_lost
        owner_lost = True
        server.should_exit = True

    app.state.server.on_owner_lost = stop
    server.run(sockets=[listener])
    exit_now(3 if owner_lost or not server.started else 0)


# ---- the supervisor ----------------------------------------------------------------------


def bind(settings: Settings) -> socket.socket:
    """HOST:PORT bound and listening, as uvicorn binds it; OSError if it cannot be."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


class ApiProcess:
    """One API process slot: its current process, and when to restart it."""

    def __init__(self, index: int, start: Callable[[int], subprocess.Popen[bytes]]) -> None:
        self.index = index
        self._start = start
        self.delay = 0.5
        self.process = start(index)
        self.started_at = time.monotonic()
        self.restart_at: float | None = None

    def watch(self, now: float) -> None:
        """Restart the process if it died (after a delay if it died young)."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restart_at = None
                self.process = self._start(self.index)
                self.started_at = now
            return
        code = self.process.poll()
        if code is None:
            return
        young = now - self.started_at < STABLE_AFTER_S
        delay = self.delay if young else 0.0
        self.delay = min(2 * self.delay, RESTART_MAX_DELAY_S) if young else 0.5
        logger.error("API process %d (pid %d) exited with %s; restarting it%s", self.index,
                     self.process.pid, code, f" in {delay:.1f} s" if delay else "")
        self.restart_at = now + delay


def supervise(settings: Settings, processes: int) -> int:
    """Run the owner and ``processes`` API processes until SIGTERM or SIGINT; the exit code
    (0, 1 no worker could start, 2 invalid settings, 3 HOST:PORT cannot be bound)."""
    from ..main import served_models
    from ..ops import tracing
    from .shell import Telemetry

    try:
        models, default = served_models(settings)
    except ValueError as exc:
        print(f"invalid server settings: {exc}", file=sys.stderr)
        return 2
    try:
        listener = bind(settings)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 3
    private = tempfile.mkdtemp(prefix="spool-")  # mode 0700
    try:
        state = ServerState(settings, [model for model, _ in models], default, None)
        state.telemetry = Telemetry(settings.log_format, tracing.enable())
        return asyncio.run(_supervise(settings, processes, state, listener, Path(private)))
    finally:
        listener.close()
        shutil.rmtree(private, ignore_errors=True)


async def _supervise(settings: Settings, processes: int, state: ServerState,
                     listener: socket.socket, private: Path) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fatal = False

    def on_fatal() -> None:
        nonlocal fatal
        fatal = True
        stop.set()

    state.on_fatal = on_fatal
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    key_file = private / "key"
    key_file.touch(mode=0o600)
    key = secrets.token_bytes(32)
    key_file.write_bytes(key)
    metrics_dir = private / "metrics"
    metrics_dir.mkdir(mode=0o700)
    pool_socket = private / "pools.sock"
    env = {**os.environ, LISTEN_FD_ENV: str(listener.fileno()),
           POOL_SOCKET_ENV: str(pool_socket), POOL_KEY_FILE_ENV: str(key_file),
           METRICS_DIR_ENV: str(metrics_dir)}

    def start(index: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", "from app.serving.frontends import api_process; "
                                   "api_process()"],
            env={**env, PROCESS_INDEX_ENV: str(index)}, pass_fds=(listener.fileno(),))
        logger.info("API process %d started (pid %d)", index, process.pid)
        return process

    async with state.lifespan(None):
        pools = {name: model.pool for name, model in state.models.items()}
        assert all(pool is not None for pool in pools.values())
        server = PoolServer(pools, pool_socket, key,
                            info=lambda: {name: owner_view(model)
                                          for name, model in state.models.items()}).start()
        logger.info("serving on http://%s:%d with %d API processes", settings.host,
                    settings.port, processes)
        slots = [ApiProcess(index, start) for index in range(processes)]
        try:
            while not stop.is_set():
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)
                if not stop.is_set():
                    now = time.monotonic()
                    for slot in slots:
                        slot.watch(now)
            logger.info("stopping: the API processes drain their requests")
            listener.close()  # no new connection from now on (the children close theirs)
            await _stop_all([slot.process for slot in slots if slot.restart_at is None],
                            settings.shutdown_timeout_s + DRAIN_MARGIN_S)
        finally:
            server.close()
    return 1 if fatal else 0


async def _stop_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM each, wait ``timeout`` at most for all, then SIGKILL the rest."""
    for process in processes:
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            logger.error("API process pid %d did not drain in time; killed", process.pid)
            process.kill()
            process.wait()
