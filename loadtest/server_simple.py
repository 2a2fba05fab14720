"""Our ``simple`` baseline: threads in one process, a random replica per request.

One model replica per device (NUM_WORKERS on CPU), all in the server process; each replica
is owned by one thread that runs its requests in arrival order. A request goes to a replica
drawn at random, whether it is idle or has ten requests waiting: nothing balances the load.
Rebuilt from the seed README's description ("a simple threaded server that randomly
dispatches requests to worker threads") before the seed's code was known, and stricter than
it: the seed's own (``loadtest/seed/server_simple.py``) lets several threads run one replica
at once.
``python -m loadtest.server_simple`` (settings from the environment, as ``python -m app``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from concurrent.futures import Future
from typing import Any

from app.contract import ImageInput, WorkerConfig
from app.settings import Settings
from stateful_pool import SWorker

from ._baseline import serve

logger = logging.getLogger("loadtest.server_simple")


class Replica:
    """One model and the thread that owns it (CUDA's current device is per thread)."""

    def __init__(self, worker_cls: type[SWorker[Any, Any]], config: WorkerConfig) -> None:
        self.worker = worker_cls()
        self.config = config
        self.inbox: queue.SimpleQueue[tuple[list[ImageInput], Future[Any]] | None] = (
            queue.SimpleQueue())
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, name=f"replica-{config.worker_index}",
                                       daemon=True)

    def serve(self) -> None:
        try:
            self.worker.spawn(self.config)
        except Exception:
            logger.exception("replica %d failed to load", self.config.worker_index)
            return
        self.ready.set()
        while (job := self.inbox.get()) is not None:
            items, future = job
            if not future.set_running_or_notify_cancel():
                continue  # the client went away while it waited
            try:
                future.set_result(self.worker.execute_batch(items))  # type: ignore[attr-defined]
            except Exception as exc:
                future.set_exception(exc)


class ThreadDispatcher:
    def __init__(self, worker_cls: type[SWorker[Any, Any]], settings: Settings) -> None:
        self.worker_cls = worker_cls
        self.replicas: list[Replica] = []

    def start(self, plan: list[WorkerConfig]) -> None:
        self.replicas = [Replica(self.worker_cls, config) for config in plan]
        for replica in self.replicas:
            replica.thread.start()

    def ready_count(self) -> int:
        return sum(r.ready.is_set() for r in self.replicas)

    async def run(self, items: list[ImageInput]) -> list[Any]:
        replica = random.choice([r for r in self.replicas if r.ready.is_set()])
        future: Future[Any] = Future()
        replica.inbox.put((items, future))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.inbox.put(None)
        for replica in self.replicas:
            replica.thread.join(timeout=10)


if __name__ == "__main__":
    serve(ThreadDispatcher)
