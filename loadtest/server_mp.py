"""Our ``mp`` baseline: one process per device, a random process per request.

Each worker process holds one model and talks to the server over its own pipe; a lock per
pipe lets one request at a time use it, so a request drawn to a busy worker waits on that
lock even when another worker is idle (there is no shared queue). A global cap bounds the
requests being dispatched at once. Rebuilt from the seed README's words ("a pool of
workers, random dispatch without producer-consumer queues") before the seed's code was
known; the seed's own is ``loadtest/seed/server_mp.py`` (its cap: 2 x GPUs). The cap here
is the size of Python's default thread pool, ``min(32, cpus + 4)``, which is what a server
that runs the blocking pipe exchange through ``run_in_executor`` gets; MP_MAX_INFLIGHT
overrides it.
``python -m loadtest.server_mp`` (settings from the environment, as ``python -m app``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from app.contract import ImageInput, WorkerConfig
from app.settings import Settings, available_cpus
from stateful_pool import SWorker

from ._baseline import serve

logger = logging.getLogger("loadtest.server_mp")


def worker_loop(conn: Connection, worker_cls: type[SWorker[Any, Any]],
                config: WorkerConfig) -> None:
    """Load the model, then answer one request per message until the pipe closes.

    Runs in the worker process.
    """
    worker = worker_cls()
    try:
        conn.send(("ready", worker.spawn(config)))
    except Exception as exc:
        conn.send(("failed", repr(exc)))
        return
    while True:
        try:
            items = conn.recv()
        except EOFError:  # the server closed its end (shutdown) or died
            return
        try:
            conn.send(("ok", worker.execute_batch(items)))  # type: ignore[attr-defined]
        except Exception as exc:
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class WorkerProcess:
    def __init__(self, worker_cls: type[SWorker[Any, Any]], config: WorkerConfig) -> None:
        # spawn, not fork: CUDA cannot be initialised in a forked child.
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=worker_loop, args=(child_conn, worker_cls, config),
                                       name=f"mp-worker-{config.worker_index}", daemon=True)
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.index = config.worker_index

    def await_ready(self) -> None:
        """Wait for the model to load. Runs in a thread of its own at start-up."""
        with self.lock:
            try:
                status, info = self.conn.recv()
            except EOFError:
                status, info = "failed", "the process exited"
        if status == "ready":
            self.ready.set()
        else:
            logger.error("worker %d failed to load: %s", self.index, info)

    def call(self, items: list[ImageInput]) -> list[Any]:
        """Send a request and wait for its answer. Blocks a thread of the dispatch pool."""
        with self.lock:
            self.conn.send(items)
            status, value = self.conn.recv()
        if status == "error":
            raise value
        return value  # type: ignore[no-any-return]


class ProcessDispatcher:
    def __init__(self, worker_cls: type[SWorker[Any, Any]], settings: Settings) -> None:
        self.worker_cls = worker_cls
        cap = int(os.environ.get("MP_MAX_INFLIGHT") or min(32, available_cpus() + 4))
        self.inflight = asyncio.Semaphore(cap)
        self.threads = ThreadPoolExecutor(max_workers=cap, thread_name_prefix="mp-dispatch")
        self.workers: list[WorkerProcess] = []

    def start(self, plan: list[WorkerConfig]) -> None:
        self.workers = [WorkerProcess(self.worker_cls, config) for config in plan]
        for worker in self.workers:
            worker.process.start()
            threading.Thread(target=worker.await_ready, daemon=True).start()

    def ready_count(self) -> int:
        return sum(w.ready.is_set() for w in self.workers)

    async def run(self, items: list[ImageInput]) -> list[Any]:
        async with self.inflight:
            worker = random.choice([w for w in self.workers if w.ready.is_set()])
            return await asyncio.get_running_loop().run_in_executor(
                self.threads, worker.call, items)

    def stop(self) -> None:
        for worker in self.workers:
            worker.conn.close()  # the worker's recv() sees EOF and returns
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
        self.threads.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    serve(ProcessDispatcher)
