"""The servers under comparison and their life cycle as subprocesses on 127.0.0.1.

Each server runs in its own session (process group), so its worker processes can be found
and reaped even if the server dies without stopping them. Every wait here has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .processes import ROOT, child_environment, group_members, log_tail

HOST = "127.0.0.1"
# Modules every server uses unchanged (the models, the upload checks, the settings) are not
# counted in any server's code size; nor is the Docker HEALTHCHECK probe, a separate program.
NOT_SERVER_CODE = {"__init__.py", "worker.py", "contract.py", "images.py", "settings.py",
                   "healthcheck.py", "examples"}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    module: str  # run as `python -m <module>`
    env: dict[str, str] = field(default_factory=dict)
    code_files: tuple[str, ...] = ()
    # True: the seed's model code (loadtest/seed/model.py: torchvision or timm names, fp32);
    # False: app.worker.ViTWorker (timm names, any precision).
    seed_model: bool = False
    args: tuple[str, ...] = ()  # after `python -m <module>`
    # Ready when this answers 200 with every worker ready (or no worker counts at all).
    ready_path: str = "/readyz"


def app_server_files() -> tuple[str, ...]:
    """``app/`` minus what the baselines share with it."""
    app = ROOT / "app"
    return tuple(sorted(f"app/{p.relative_to(app).as_posix()}" for p in app.rglob("*.py")
                        if not NOT_SERVER_CODE & {p.name, *p.relative_to(app).parts[:-1]}))


def server_specs(max_batch_size: int, max_batch_wait_ms: float) -> dict[str, ServerSpec]:
    """Every server the runner knows, by the name used on the command line."""
    baseline = "loadtest/_baseline.py"
    return {spec.name: spec for spec in (
        ServerSpec("simple", "threads in one process, a random replica per request",
                   "loadtest.server_simple", code_files=("loadtest/server_simple.py", baseline)),
        ServerSpec("mp", "a process per worker, a locked pipe each, random dispatch, "
                   "global cap", "loadtest.server_mp",
                   code_files=("loadtest/server_mp.py", baseline)),
        ServerSpec("spool", "app/ (SPool, shared queue), batching off", "app",
                   env={"MAX_BATCH_SIZE": "1", "MAX_BATCH_WAIT_MS": "0"},
                   code_files=app_server_files()),
        ServerSpec("spool-batch", f"app/ with batching (up to {max_batch_size}, "
                   f"wait {max_batch_wait_ms:g} ms)", "app",
                   env={"MAX_BATCH_SIZE": str(max_batch_size),
                        "MAX_BATCH_WAIT_MS": str(max_batch_wait_ms)},
                   code_files=app_server_files()),
        ServerSpec("spool-min", "the baselines' skeleton with SPool as dispatcher, batching off",
                   "loadtest.server_spool", env={"MAX_BATCH_SIZE": "1"},
                   code_files=("loadtest/server_spool.py", baseline)),
        # stateful-pool 0.3.2's benchmark servers as it ran them, and the DataParallel one.
        ServerSpec("seed-simple", "the seed's server_simple: replicas in one process, "
                   "random.choice + to_thread, no lock", "loadtest.seed.server_simple",
                   code_files=("loadtest/seed/server_simple.py",), seed_model=True),
        ServerSpec("seed-mp", "the seed's server_mp: a process per GPU, Pipe, Semaphore(2 x "
                   "GPUs), random worker, a Lock per pipe", "loadtest.seed.server_mp",
                   code_files=("loadtest/seed/server_mp.py",), seed_model=True),
        ServerSpec("seed-spool", "the seed's server_spool: SPool, a whole request per task",
                   "loadtest.seed.server_spool",
                   code_files=("loadtest/seed/server_spool.py",), seed_model=True),
        ServerSpec("dp", "one process, torch.nn.DataParallel over every GPU, Semaphore(1)",
                   "loadtest.seed.server_dp", code_files=("loadtest/seed/server_dp.py",),
                   seed_model=True),
    )}


def inherited_environment() -> dict[str, str]:
    """This process's environment minus the server settings (NUM_WORKERS, MAX_BATCH_SIZE...):
    a value left in the shell must not change one server and not the others."""
    from app.settings import Settings

    settings = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in settings}


class ServerError(RuntimeError):
    """A server did not start, did not become ready in time, or answered a warm-up badly."""


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# Requests to 127.0.0.1 never go through a proxy a developer's shell may name.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """One server as a subprocess: start, wait for every worker, warm up, stop.

    Also a context manager: ``with ServerProcess(...) as server`` starts it and always stops
    it, reaping any worker left in its process group.
    """

    def __init__(self, spec: ServerSpec, env: dict[str, str], log_path: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = child_environment({**inherited_environment(), **env, **spec.env,
                                      "HOST": HOST, "PORT": str(self.port)})
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.spec.module, *self.spec.args], cwd=ROOT,
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until every planned worker is ready (``/readyz`` of app/ turns 200 with the
        first one; a comparison must not start with half the workers)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.spec.name} exited with {self.process.returncode} "
                                  f"before it was ready:\n{self.log_tail()}")
            try:
                with _LOCAL.open(f"{self.url}{self.spec.ready_path}", timeout=2) as response:
                    body = json.loads(response.read())
                if body.get("workers_ready") == body.get("workers"):
                    return body  # type: ignore[no-any-return]
                last = json.dumps(body)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.25)
        raise ServerError(f"{self.spec.name} not ready after {timeout:g} s ({last}):\n"
                          f"{self.log_tail()}")

    def warm_up(self, bodies: list[tuple[bytes, str]], expected: int, concurrency: int) -> None:
        """A few requests in parallel, so first-call costs (allocations, lazy imports) stay
        out of the measurement and every replica has run at least once (likely, for random
        dispatch). Any wrong answer fails the server before the load starts."""
        def post(body: tuple[bytes, str]) -> None:
            request = urllib.request.Request(f"{self.url}/predict", data=body[0],
                                             headers={"Content-Type": body[1]}, method="POST")
            try:
                with _LOCAL.open(request, timeout=120) as response:
                    count = len(json.loads(response.read())["predictions"])
            except urllib.error.HTTPError as exc:
                raise ServerError(f"{self.spec.name} warm-up: HTTP {exc.code} "
                                  f"{exc.read()[:300]!r}") from None
            except (OSError, ValueError) as exc:  # refused, reset, timed out, not JSON
                raise ServerError(f"{self.spec.name} warm-up: {exc}\n{self.log_tail()}") from None
            if count != expected:
                raise ServerError(f"{self.spec.name} warm-up: {count} predictions for "
                                  f"{expected} images")

        with ThreadPoolExecutor(concurrency) as threads:
            list(threads.map(post, bodies))

    def stop(self, timeout: float = 30.0) -> tuple[int | None, list[int]]:
        """SIGTERM, then SIGKILL past ``timeout``; then reap any process left in the group.

        Returns:
            ``(exit code, pids that outlived the server and were killed)``.
        """
        if self.process is None:
            return None, []
        pgid = self.process.pid  # start_new_session: the server leads its own group
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        leftovers = group_members(pgid)
        if leftovers:  # workers give up a few seconds after their parent died; wait a bit
            deadline = time.monotonic() + 5
            while leftovers and time.monotonic() < deadline:
                time.sleep(0.1)
                leftovers = group_members(pgid)
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.process.returncode, leftovers
