"""The figures of a load test: one ``RunResult`` per run (from locust's JSON or the seed
client's), their mean and spread over the repeats of a setting (``Aggregate``), the code size
of each server, and the summary's JSON and CSV files.

``report.py`` turns these into the Markdown table, the verdicts and the chart.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import statistics
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PERCENTILES = (0.50, 0.95, 0.99)


@dataclass(frozen=True)
class RunResult:
    """One locust run against one server: throughput counts successful requests only."""

    server: str
    images_per_request: int
    repeat: int
    requests: int
    failures: int
    duration_s: float
    requests_per_s: float
    images_per_s: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    load_average_1m: float
    top_error: str = ""  # the most frequent failure, for the table's error list


@dataclass(frozen=True)
class Aggregate:
    """The repeats of one (server, images per request): mean and sample std of each figure."""

    server: str
    images_per_request: int
    repeats: int
    requests: int
    failures: int
    images_per_s: float
    images_per_s_std: float
    requests_per_s: float
    requests_per_s_std: float
    latency_p50_ms: float
    latency_p50_ms_std: float
    latency_p95_ms: float
    latency_p95_ms_std: float
    latency_p99_ms: float
    latency_p99_ms_std: float
    # Added for the 0.3.2 benchmark's load; results written before it read them as NaN.
    latency_mean_ms: float = math.nan
    latency_mean_ms_std: float = math.nan


def percentile(histogram: dict[Any, int], fraction: float) -> float:
    """The smallest response time with at least ``fraction`` of the requests at or below it.

    ``histogram`` is locust's ``response_times`` (time in ms, rounded by locust to 2
    significant digits above 100 ms, -> count); JSON turns its keys into strings.
    """
    counts = sorted((float(t), n) for t, n in histogram.items())
    total = sum(n for _, n in counts)
    if not total:
        return math.nan
    needed = math.ceil(fraction * total)
    seen = 0
    for time_ms, count in counts:
        seen += count
        if seen >= needed:
            return time_ms
    return counts[-1][0]


def run_result(stats: list[dict[str, Any]], run_info: dict[str, Any], *, server: str,
               images_per_request: int, repeat: int, planned_duration_s: float,
               load_average_1m: float, name: str = "/predict") -> RunResult:
    """Summarise one run from locust's ``--json-file`` output (a list of stats entries) and
    the locustfile's ``--run-info`` (``stopped_at``, ``errors``)."""
    errors: dict[str, int] = run_info.get("errors") or {}
    top_error = max(errors, key=errors.__getitem__, default="")
    entry = next((e for e in stats if e.get("name") == name), None)
    if entry is None or not entry["num_requests"]:
        return RunResult(server, images_per_request, repeat, 0, 0, planned_duration_s, 0.0, 0.0,
                         math.nan, math.nan, math.nan, math.nan, load_average_1m, top_error)
    requests, failures = entry["num_requests"], entry["num_failures"]
    # The measured window runs from locust's stats reset (once every user is running) to the
    # moment the load stopped. Not to the last answer: with few, slow answers that can come
    # long before the end (one answer just after the reset read as 400,000 images/s).
    first, stopped = entry.get("start_time"), run_info.get("stopped_at")
    duration = stopped - first if first and stopped and stopped > first else planned_duration_s
    ok_per_s = (requests - failures) / duration
    p50, p95, p99 = (percentile(entry["response_times"], q) for q in PERCENTILES)
    return RunResult(
        server=server, images_per_request=images_per_request, repeat=repeat,
        requests=requests, failures=failures, duration_s=round(duration, 3),
        requests_per_s=ok_per_s, images_per_s=ok_per_s * images_per_request,
        latency_mean_ms=entry["total_response_time"] / requests,
        latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99,
        load_average_1m=load_average_1m, top_error=top_error)


def seed_run_result(client: dict[str, Any], *, server: str, repeat: int,
                    load_average_1m: float) -> RunResult:
    """Summarise one run of ``loadtest.seed.client``: a fixed number of requests.

    As the seed computed them: throughput over the run's wall time, from the first request
    sent to the last answer; latency as each client saw its request. Throughput counts
    answered requests only; the latency figures cover every request, as locust's do.
    """
    ipr, wall = client["images_per_request"], client["wall_s"]
    latencies = client["latencies_ms"]
    ok_per_s = (client["requests"] - client["failures"]) / wall if wall > 0 else 0.0
    histogram: dict[float, int] = {}
    for latency in latencies:
        histogram[latency] = histogram.get(latency, 0) + 1
    p50, p95, p99 = (percentile(histogram, q) for q in PERCENTILES)
    errors: dict[str, int] = client.get("errors") or {}
    return RunResult(
        server=server, images_per_request=ipr, repeat=repeat, requests=client["requests"],
        failures=client["failures"], duration_s=round(wall, 3), requests_per_s=ok_per_s,
        images_per_s=ok_per_s * ipr,
        latency_mean_ms=statistics.fmean(latencies) if latencies else math.nan,
        latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99,
        load_average_1m=load_average_1m,
        top_error=max(errors, key=errors.__getitem__, default=""))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: Iterable[RunResult]) -> list[Aggregate]:
    """Group runs by (server, images per request), keeping the servers' first-seen order."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.server, run.images_per_request), []).append(run)
    result = []
    for (server, ipr), group in groups.items():
        figures: dict[str, float] = {}
        for key in ("images_per_s", "requests_per_s", "latency_p50_ms", "latency_p95_ms",
                    "latency_p99_ms", "latency_mean_ms"):
            figures[key], figures[f"{key}_std"] = _mean_std([getattr(r, key) for r in group])
        result.append(Aggregate(
            server=server, images_per_request=ipr, repeats=len(group),
            requests=sum(r.requests for r in group), failures=sum(r.failures for r in group),
            **figures))
    return sorted(result, key=lambda a: a.images_per_request)


# ---- code size ----------------------------------------------------------------------------

def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                docstring_lines.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstring_lines)


# ---- files --------------------------------------------------------------------------------

def _clean(value: Any) -> Any:
    """NaN is not JSON: a figure that could not be measured is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(document), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Any], row_type: type) -> None:
    names = [f.name for f in fields(row_type)]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in asdict(row).items()})


def from_json(row_type: type, row: dict[str, Any]) -> Any:
    """A row of summary.json back as ``row_type``; null (not measured) as NaN."""
    return row_type(**{k: math.nan if v is None else v for k, v in row.items()})

