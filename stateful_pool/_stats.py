"""Frozen snapshots of a pool's state, for health checks and metrics."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ._batching import BatchCounter
from ._states import LIVE_STATES, WorkerState

# Bucket upper bounds, in seconds, of the time histograms (the last bucket is +Inf).
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)


@dataclass(frozen=True)
class Histogram:
    """Observed durations in seconds: ``counts[i]`` fell in ``(bounds[i-1], bounds[i]]``, the
    last count above ``bounds[-1]``; ``sum`` and ``count`` over all of them."""

    bounds: tuple[float, ...] = TIME_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(TIME_BUCKETS) + 1)
    sum: float = 0.0
    count: int = 0


class TimeRecorder:
    """The mutable side of a ``Histogram``: one dispatcher thread records, anyone snapshots."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(TIME_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(TIME_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> Histogram:
        return Histogram(TIME_BUCKETS, tuple(self.counts), self.sum, self.count)


@dataclass(frozen=True)
class WorkerStats:
    """One worker at the moment of the snapshot.

    ``state`` is a ``WorkerState`` (a ``str`` enum: ``"starting"``, ``"idle"``, ``"busy"``,
    ``"restarting"`` (waiting out its backoff after a crash), ``"backing_off"`` (its restart
    budget is spent and the pool heals: it waits longer, then respawns), ``"stopping"``,
    ``"stopped"`` or ``"dead"`` (spawn failed, or restart budget spent without healing)).
    ``restarts`` counts respawns after crashes; ``last_exitcode`` is the exit code of its
    previous process (negative: killed by that signal), or ``None``; ``last_failure`` says
    why its previous process failed (``"died with signal SIGKILL"``, ``"spawn failed:
    ..."``), or ``None``; ``restart_in`` is the seconds left before its next respawn while
    restarting or backing off, else ``None``. ``host`` and ``node`` say where it runs (the
    machine's name or IP; the Ray node id, ``None`` for local processes); ``gpu_ids`` are the
    GPUs Ray assigned to it.
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
    run_time: Histogram = field(default_factory=Histogram)
    restart_in: float | None = None
    last_failure: str | None = None


@dataclass(frozen=True)
class PoolStats:
    """The whole pool at the moment of the snapshot.

    Counters (``submitted`` .. ``restarts``, ``batches``) only grow. ``queue_depth`` counts
    tasks waiting for a worker; ``in_flight`` adds the ones running. ``batch_size_hist`` maps
    a batch size to how many batches of that size ran (empty without batching).
    ``queue_wait`` is how long tasks waited between submission and reaching a worker;
    ``run_time`` how long they took from reaching a worker to their result (``WorkerStats``
    has the same per worker): a slow model and a long queue look different here.
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
    queue_wait: Histogram = field(default_factory=Histogram)
    run_time: Histogram = field(default_factory=Histogram)

    @property
    def live_workers(self) -> int:
        """Workers that can take tasks now or will again on their own (starting, idle, busy,
        restarting or backing off)."""
        return sum(w.state in LIVE_STATES for w in self.workers)

    @property
    def serving_workers(self) -> int:
        """Workers running now (idle or busy): what a readiness check counts."""
        return sum(w.state == WorkerState.IDLE or w.state == WorkerState.BUSY
                   for w in self.workers)

    @property
    def busy_workers(self) -> int:
        return sum(w.state == WorkerState.BUSY for w in self.workers)


class Counters:
    """The pool's running totals and timings; only the dispatcher thread changes them (under
    its scheduling lock), any thread may ``snapshot`` them."""

    def __init__(self) -> None:
        self.submitted = self.completed = self.failed = 0
        self.cancelled = self.timed_out = self.restarts = 0
        self.batches = BatchCounter()
        self.queue_wait = TimeRecorder()
        self.run_time = TimeRecorder()

    def snapshot(self, workers: tuple[WorkerStats, ...], queued: int) -> PoolStats:
        b = self.batches
        return PoolStats(
            workers=workers, queue_depth=queued,
            in_flight=queued + sum(w.running for w in workers),
            submitted=self.submitted, completed=self.completed, failed=self.failed,
            cancelled=self.cancelled, timed_out=self.timed_out, restarts=self.restarts,
            batches=b.batches, batch_size_mean=b.mean, batch_size_max=b.largest,
            batch_size_hist=dict(b.histogram), queue_wait=self.queue_wait.snapshot(),
            run_time=self.run_time.snapshot())


Histogram.__module__ = "stateful_pool"
WorkerStats.__module__ = "stateful_pool"
PoolStats.__module__ = "stateful_pool"
