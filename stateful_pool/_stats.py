"""Frozen snapshots of a pool's state, for health checks and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._states import LIVE_STATES, WorkerState


@dataclass(frozen=True)
class WorkerStats:
    """One worker at the moment of the snapshot.

    ``state`` is a ``WorkerState`` (a ``str`` enum: ``"starting"``, ``"idle"``, ``"busy"``,
    ``"restarting"`` (waiting out its backoff after a crash), ``"stopping"``, ``"stopped"`` or
    ``"dead"`` (restart budget spent)). ``restarts`` counts respawns after crashes;
    ``last_exitcode`` is the exit code of its previous process (negative: killed by that
    signal), or ``None``. ``host`` and ``node`` say where it runs (the machine's name or
    IP; the Ray node id, ``None`` for local processes); ``gpu_ids`` are the GPUs Ray
    assigned to it.
    """

    worker_id: int
    pid: int | None
    state: WorkerState
    tasks_done: int
    restarts: int
    running: int
    last_exitcode: int | None
    host: str | None = None
    node: str | None = None
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PoolStats:
    """The whole pool at the moment of the snapshot.

    Counters (``submitted`` .. ``restarts``, ``batches``) only grow. ``queue_depth`` counts
    tasks waiting for a worker; ``in_flight`` adds the ones running. ``batch_size_hist`` maps
    a batch size to how many batches of that size ran (empty without batching).
    """

    workers: tuple[WorkerStats, ...]
    queue_depth: int
    in_flight: int
    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    restarts: int
    batches: int
    batch_size_mean: float
    batch_size_max: int
    batch_size_hist: dict[int, int] = field(default_factory=dict)

    @property
    def live_workers(self) -> int:
        """Workers that can take tasks now or soon (starting, idle, busy or restarting)."""
        return sum(w.state in LIVE_STATES for w in self.workers)

    @property
    def busy_workers(self) -> int:
        return sum(w.state == WorkerState.BUSY for w in self.workers)


WorkerStats.__module__ = "stateful_pool"
PoolStats.__module__ = "stateful_pool"
