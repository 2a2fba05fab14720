"""The comparison skeleton with ``SPool`` as dispatcher: the seed's ``server_spool``.

Not the benchmarked spool server (that is ``app/``, with its deadlines, queue limits,
metrics and crash handling); it exists so the code-size column compares like with like:
the same HTTP layer as the two baselines, and a dispatcher that is only the pool.
Each image is its own task, so with MAX_BATCH_SIZE > 1 images of different requests share
a forward pass. ``python -m loadtest.server_spool``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.contract import ImageInput, WorkerConfig
from app.settings import Settings
from stateful_pool import SPool, SWorker, WorkerState

from ._baseline import serve


class SpoolDispatcher:
    def __init__(self, worker_cls: type[SWorker[Any, Any]], settings: Settings) -> None:
        self.pool: SPool[Any, Any] = SPool(worker_cls, max_batch_size=settings.max_batch_size,
                                           max_batch_wait=settings.max_batch_wait_ms / 1000)

    def start(self, plan: list[WorkerConfig]) -> None:
        for config in plan:
            self.pool.submit_spawn(config)

    def ready_count(self) -> int:
        ready = (WorkerState.IDLE, WorkerState.BUSY)
        return sum(w.state in ready for w in self.pool.stats().workers)

    async def run(self, items: list[ImageInput]) -> list[Any]:
        return await asyncio.gather(*(self.pool.async_execute(item) for item in items),
                                    return_exceptions=True)

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True, timeout=10)


if __name__ == "__main__":
    serve(SpoolDispatcher)
