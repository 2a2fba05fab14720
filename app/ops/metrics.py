"""Prometheus metrics: HTTP traffic, and the pool read from ``pool.stats()`` at scrape time.

Each app gets its own registry, so several apps in one process (tests) never collide, and the
pool's figures are read when scraped rather than pushed on every task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from stateful_pool import Histogram, PoolStats, WorkerState

REFUSAL_REASONS = ("deadline", "queue_full", "shed", "not_ready", "shutting_down")
# Latency buckets span an echo worker (ms) to ViT-L on CPU under load (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A progress report has a few chunks, a generated text thousands of tokens.
CHUNK_BUCKETS = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384)


class PoolCollector(Collector):
    """Exposes a snapshot of each model's pool. ``stats`` maps a model's name to its pool's
    snapshot (None before the pool exists). With several models every series has a
    ``model`` label; a server of one model leaves it out, so its series are those of any
    single-pool server."""

    def __init__(self, stats: Callable[[], Mapping[str, PoolStats | None]],
                 random_weights: Callable[[], Mapping[str, list[int]]] = dict) -> None:
        self._stats = stats
        self._random = random_weights

    def collect(self) -> Iterator[Metric]:
        snapshots = {name: s for name, s in self._stats().items() if s is not None}
        if not snapshots:
            return
        labelled = len(self._stats()) > 1
        extra = ["model"] if labelled else []
        random = self._random()

        def family(kind: Any, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return kind(name, doc, labels=[*extra, *labels])

        def add(metric: Any, model: str, labels: Sequence[str], *values: Any) -> None:
            metric.add_metric([model, *labels] if labelled else list(labels), *values)

        queue = family(GaugeMetricFamily, "pool_queue_depth", "Tasks waiting for a worker")
        in_flight = family(GaugeMetricFamily, "pool_in_flight", "Tasks queued or running")
        busy = family(GaugeMetricFamily, "pool_busy_workers", "Workers running a task")
        states = family(GaugeMetricFamily, "pool_workers", "Workers by state", ["state"])
        info = family(GaugeMetricFamily, "pool_worker_info", "One series per worker: where it "
                      "runs and its state", ["worker_id", "state", "host", "node", "gpu_ids"])
        restart_in = family(
            GaugeMetricFamily, "pool_worker_restart_in_seconds", "Seconds until a down "
            "worker's next start attempt (restarting, or backing off after a crash loop)",
            ["worker_id"])
        restarts = family(CounterMetricFamily, "pool_worker_restarts",
                          "Worker respawns after a crash")
        tasks = family(CounterMetricFamily, "pool_tasks", "Tasks by outcome", ["outcome"])
        batches = family(HistogramMetricFamily, "pool_batch_size", "Tasks per execute_batch "
                         "call")
        # Queue wait against run time: a long queue and a slow model look different here.
        wait = family(HistogramMetricFamily, "pool_queue_wait_seconds",
                      "Time a task waited for a worker (submission to start)")
        run = family(HistogramMetricFamily, "pool_task_run_seconds",
                     "Time a task took on its worker (start to result)", ["worker_id"])
        on_random = family(GaugeMetricFamily, "model_random_weights", "1 while a worker serves "
                           "RANDOM weights (meaningless predictions), else 0", ["worker_id"])
        for model, s in snapshots.items():
            add(queue, model, (), s.queue_depth)
            add(in_flight, model, (), s.in_flight)
            add(busy, model, (), s.busy_workers)
            for state in WorkerState:
                add(states, model, [state], sum(w.state == state for w in s.workers))
            random_ids = set(random.get(model, ()))
            for w in s.workers:
                worker = str(w.worker_id)
                add(info, model, [worker, w.state, w.host or "", w.node or "",
                                  ",".join(map(str, w.gpu_ids))], 1)
                if w.restart_in is not None:
                    add(restart_in, model, [worker], w.restart_in)
                add(run, model, [worker], *histogram_buckets(w.run_time))
                add(on_random, model, [worker], int(w.worker_id in random_ids))
            add(restarts, model, (), s.restarts)
            for outcome in ("submitted", "completed", "failed", "cancelled", "timed_out"):
                add(tasks, model, [outcome], getattr(s, outcome))
            add(batches, model, (), *batch_size_buckets(s))
            add(wait, model, (), *histogram_buckets(s.queue_wait))
        yield from (queue, in_flight, busy, states, info, restart_in, restarts, tasks, batches,
                    wait, run, on_random)


def histogram_buckets(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and the sum, from the pool's non-cumulative counts."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*map(str, h.bounds), "+Inf"], h.counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets, h.sum


def batch_size_buckets(s: PoolStats) -> tuple[list[tuple[str, float]], float]:
    """The batch-size histogram's cumulative buckets and sum."""
    buckets: list[tuple[str, float]] = [
        (str(bound), sum(n for size, n in s.batch_size_hist.items() if size <= bound))
        for bound in BATCH_BUCKETS]
    buckets.append(("+Inf", s.batches))
    return buckets, s.batch_size_mean * s.batches


class Metrics:
    """The app's registry and its HTTP instruments."""

    def __init__(self, pool_stats: Callable[[], Mapping[str, PoolStats | None]],
                 random_weights: Callable[[], Mapping[str, list[int]]] = dict,
                 workers_planned: Callable[[], int] | None = None,
                 failed_to_start: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        if workers_planned is not None:
            Gauge("server_workers_planned", "Workers the server runs when all is well",
                  registry=self.registry).set_function(workers_planned)
        if failed_to_start is not None:
            Gauge("server_workers_failed_to_start", "Planned workers whose start failed "
                  "(tried again with a back-off)",
                  registry=self.registry).set_function(failed_to_start)
        self.connections_refused = Counter(
            "http_connections_refused", "Connections closed at once because MAX_CONNECTIONS "
            "were open", registry=self.registry)
        self.connections_silent = Counter(
            "http_connections_silent", "Connections closed because no request head arrived "
            "within BODY_TIMEOUT_S of their opening", registry=self.registry)
        self.requests = Counter(
            "http_requests", "HTTP requests by route and status",
            ["method", "route", "status"], registry=self.registry)
        self.latency = PromHistogram(
            "http_request_duration_seconds", "Time from request to last response byte",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge(
            "http_requests_in_progress", "Requests being handled", registry=self.registry)
        self.abandoned = Counter(
            "http_requests_abandoned", "Inference requests whose client disconnected before "
            "the answer (their queued tasks were withdrawn)", registry=self.registry)
        self.expired = Counter(
            "http_requests_expired", "Inference requests answered 504: their deadline passed",
            registry=self.registry)
        self.first_chunk = PromHistogram(
            "stream_first_chunk_seconds", "Time from a streaming request's arrival to its "
            "first chunk", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stream_chunks = PromHistogram(
            "stream_chunks", "Chunks per stream (those the client received, or collected into "
            "one answer)", buckets=CHUNK_BUCKETS, registry=self.registry)
        self.refused = Counter(
            "http_requests_refused", "Inference requests answered 503 at once, by reason: "
            "deadline (it could not finish in time), queue_full, shed (refused before its "
            "body was read, by either rule), not_ready, shutting_down",
            ["reason"], registry=self.registry)
        # Every reason from the start, at 0: a rate() over a series that appears late misses
        # its first increase.
        self._refused: dict[str, Any] = {reason: self.refused.labels(reason)
                                         for reason in REFUSAL_REASONS}
        ProcessCollector(registry=self.registry)
        self.registry.register(PoolCollector(pool_stats, random_weights))

        # Labelled children, looked up once: ``labels()`` takes a lock and builds a key per
        # call, which showed in the event loop's profile under load.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    def refused_by(self, reason: str) -> None:
        counter = self._refused.get(reason)
        if counter is None:
            counter = self._refused[reason] = self.refused.labels(reason)
        counter.inc()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[method, route, status] = self.requests.labels(
                method, route, str(status))
        latency = self._latencies.get((method, route))
        if latency is None:
            latency = self._latencies[method, route] = self.latency.labels(method, route)
        counter.inc()
        latency.observe(seconds)
