"""stateful_pool: pools of stateful worker processes. Spawn once, execute many, never hang.

Quick start::

    from stateful_pool import SPool, SWorker

    class Square(SWorker):
        def spawn(self, offset):
            self.offset = offset          # expensive setup goes here (load a model...)
            return "ready"

        def execute(self, x):
            return x * x + self.offset

    if __name__ == "__main__":
        with SPool(Square) as pool:
            pool.spawn(offset=1)
            print(pool.execute(3))        # 10
"""

from __future__ import annotations

from ._calls import CallOptions
from ._pool import SPool
from ._remote import PoolClient, PoolServer, RemotePool, ServerGoneError
from ._states import TaskState, WorkerState
from ._stats import Histogram, PoolStats, WorkerStats
from ._stream import AsyncChunkStream, ChunkStream
from ._stream_worker import END_OF_STREAM
from ._worker import SWorker, current_contexts
from .errors import (
    NoWorkersError,
    PoolClosedError,
    PoolError,
    QueueFullError,
    RemoteError,
    SpawnError,
    SpawnTimeoutError,
    TaskTimeoutError,
    WorkerCrashedError,
)

SWorker.__module__ = "stateful_pool"
WorkerState.__module__ = "stateful_pool"
current_contexts.__module__ = "stateful_pool"
TaskState.__module__ = "stateful_pool"
CallOptions.__module__ = "stateful_pool"
ChunkStream.__module__ = "stateful_pool"
AsyncChunkStream.__module__ = "stateful_pool"
type(END_OF_STREAM).__module__ = "stateful_pool"

__version__ = "0.4.0"

__all__ = [
    "AsyncChunkStream",
    "CallOptions",
    "ChunkStream",
    "END_OF_STREAM",
    "Histogram",
    "NoWorkersError",
    "PoolClient",
    "PoolClosedError",
    "PoolError",
    "PoolServer",
    "PoolStats",
    "QueueFullError",
    "RemoteError",
    "RemotePool",
    "SPool",
    "SWorker",
    "ServerGoneError",
    "SpawnError",
    "SpawnTimeoutError",
    "TaskState",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerState",
    "WorkerStats",
    "current_contexts",
]
