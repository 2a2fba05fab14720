"""From locust's JSON to the results: per-run figures, mean and spread over repeats, the
Markdown table, the chart, and the code size of each server.

``python -m loadtest.report RESULTS_DIR`` redraws ``results.md`` and ``chart.png`` from that
folder's ``summary.json``: for results made on a machine without matplotlib (the GPU
machines here have none).
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
# The servers a spool server is measured against: ours, and the seed-shaped ones.
BASELINES = ("simple", "mp", "seed-simple", "seed-mp", "dp")
SEED_SPOOL = "seed-spool"
SEED_CLAIM = 1.3  # "about 30% higher throughput" than the other servers (the seed's README)


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


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_baseline(aggregates: Sequence[Aggregate], ipr: int) -> Aggregate | None:
    candidates = [a for a in aggregates if a.server in BASELINES and a.images_per_request == ipr
                  and not math.isnan(a.images_per_s)]
    return max(candidates, key=lambda a: a.images_per_s, default=None)


def verdicts(aggregates: Sequence[Aggregate], raw_model: dict[str, Any] | None = None,
             gpu: bool = False) -> list[str]:
    """The load-test targets, checked per setting.

    CPU: each spool server at least matches the better baseline's images/s, with a lower p99.
    GPU: at 1 image per request, spool-batch reaches 3x the better baseline and 0.8x the bare
    model. The ratios are printed either way; only the verdict words depend on ``gpu``.
    """
    lines = []
    ceiling = (raw_model or {}).get("best_images_per_s")
    for ipr in sorted({a.images_per_request for a in aggregates}):
        best = best_baseline(aggregates, ipr)
        for spool in (a for a in aggregates
                      if a.images_per_request == ipr and a.server.startswith("spool")):
            parts = []
            if best is not None and best.images_per_s:
                ratio = spool.images_per_s / best.images_per_s
                p99_ratio = spool.latency_p99_ms / best.latency_p99_ms
                parts.append(f"vs {best.server} (the better baseline): images/s x{ratio:.2f}, "
                             f"p99 x{p99_ratio:.2f}")
                if not gpu:
                    parts.append("cpu target met" if ratio >= 1.0 and p99_ratio < 1.0
                                 else "cpu target NOT met")
                elif ipr == 1 and spool.server == "spool-batch":
                    parts.append(f"gpu target (>= x3) {'met' if ratio >= 3 else 'NOT met'}")
            if ceiling and ipr == 1:
                share = spool.images_per_s / ceiling
                parts.append(f"x{share:.2f} of the bare model")
                if gpu and spool.server == "spool-batch":
                    parts.append(f"gpu target (>= x0.8) {'met' if share >= 0.8 else 'NOT met'}")
            if parts:
                lines.append(f"{ipr} image(s)/request, {spool.server}: " + "; ".join(parts))
    return lines


def seed_claim(aggregates: Sequence[Aggregate]) -> list[str]:
    """The seed's claim, checked per setting: seed-spool at about 1.3x the images/s of the
    seed's two baselines, with steadier latency (the std of the mean latency over runs)."""
    lines = []
    for ipr in sorted({a.images_per_request for a in aggregates}):
        here = {a.server: a for a in aggregates if a.images_per_request == ipr}
        spool = here.get(SEED_SPOOL)
        others = [a for name, a in here.items() if name != SEED_SPOOL]
        if spool is None or math.isnan(spool.images_per_s) or not others:
            continue
        ratios = ", ".join(f"x{spool.images_per_s / a.images_per_s:.2f} vs {a.server}"
                           for a in others if a.images_per_s)
        published = [a for a in others if a.server in ("seed-simple", "seed-mp")]
        verdict = ""
        if published:
            holds = all(spool.images_per_s >= SEED_CLAIM * a.images_per_s for a in published)
            verdict = (f"; the claim (x{SEED_CLAIM:g} vs seed-simple and seed-mp) "
                       f"{'holds' if holds else 'does not hold'} here")
        spread = ", ".join(f"{a.server} {a.latency_mean_ms_std:.0f}" for a in (spool, *others))
        lines.append(f"{ipr} image(s)/request: {SEED_SPOOL} images/s {ratios}{verdict}; "
                     f"std of the mean latency over runs (ms): {spread}")
    return lines


def markdown(summary: dict[str, Any], aggregates: Sequence[Aggregate],
             runs: Sequence[RunResult] = ()) -> str:
    config, env = summary["config"], summary["environment"]
    seed_load = config.get("load") == "seed"
    if seed_load:
        load = (f"{config['users']} client processes posting with "
                f"`{config.get('client') or 'requests'}` (blocking), "
                f"{config['requests_per_run']} requests per run, {config['repeats']} run(s) "
                f"per setting; {config['image_source']}; mean ± std over runs.")
        columns = ("| server | img/req | images/s | requests/s | latency ms (mean) | p99 ms | "
                   "failed | images/s vs best baseline |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        load = (f"{config['users']} closed-loop users, {config['duration_s']} s per run, "
                f"{config['repeats']} repeat(s); mean ± std over repeats.")
        columns = ("| server | img/req | images/s | requests/s | p50 ms | p95 ms | p99 ms | "
                   "failed | images/s vs best baseline |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = [
        f"# Load test: `{config['preset']}` preset",
        "",
        f"{env['date']} · {env['cpus']} CPU(s), {env['accelerator']} · git {env['git_commit']} · "
        f"load average {env['load_average_before']} before, {env['load_average_after']} after",
        "",
        f"Model `{config['model']}` ({config['weights']} weights, {config['precision']}) on "
        f"{config['device']}, {config['workers'] or 'one per GPU'} worker(s); {load}",
        "",
        columns,
    ]
    for a in aggregates:
        best = best_baseline(aggregates, a.images_per_request)
        ratio = (f"x{a.images_per_s / best.images_per_s:.2f}"
                 if best and best.images_per_s else "n/a")
        latency = (f"| {_pm(a.latency_mean_ms, a.latency_mean_ms_std, 0)} " if seed_load else
                   f"| {_pm(a.latency_p50_ms, a.latency_p50_ms_std, 0)} "
                   f"| {_pm(a.latency_p95_ms, a.latency_p95_ms_std, 0)} ")
        out.append(
            f"| {a.server} | {a.images_per_request} | {_pm(a.images_per_s, a.images_per_s_std)} "
            f"| {_pm(a.requests_per_s, a.requests_per_s_std)} {latency}"
            f"| {_pm(a.latency_p99_ms, a.latency_p99_ms_std, 0)} "
            f"| {a.failures}/{a.requests} | {ratio} |")
    claim = seed_claim(aggregates)
    if claim:
        out += ["", "The seed's claim (its README): the spool server about 30% more throughput "
                "than the others, steadier latency, about 40% less code.", ""]
        out += [f"- {line}" for line in claim]
        sizes = {name: info["code_lines"] for name, info in summary.get("code_size", {}).items()}
        others = [name for name in ("seed-simple", "seed-mp", "dp") if sizes.get(name)]
        if sizes.get(SEED_SPOOL) and others:
            out.append(f"- code: {SEED_SPOOL} {sizes[SEED_SPOOL]} lines; " + ", ".join(
                f"{name} {sizes[name]} (x{sizes[SEED_SPOOL] / sizes[name]:.2f})"
                for name in others) + "; the claim is about x0.6")
    raw_model = summary.get("raw_model") or {}
    if raw_model.get("best_images_per_s"):
        rates = ", ".join(f"batch {k}: {v:g}"
                          for k, v in raw_model["images_per_s_by_batch"].items())
        out += ["", f"Bare model (forward pass only, no HTTP or decoding; {raw_model['scope']}, "
                f"{raw_model['precision']}): **{raw_model['best_images_per_s']:g} images/s** at "
                f"batch {raw_model['best_batch_size']} (one worker: {rates} images/s)."]
    elif raw_model.get("error"):
        out += ["", f"Bare model timing failed: {raw_model['error'][:300]}"]
    checks = verdicts(aggregates, raw_model, gpu=config["device"] != "cpu")
    if checks:
        out += ["", "Targets: on the cpu preset, spool >= the better baseline in "
                "images/s and a lower p99; on a GPU, spool-batch >= 3x the better baseline and "
                ">= 0.8x the bare model at 1 image/request.", ""] + [f"- {line}" for line in checks]
    out += ["", "Code size: lines holding code (no blank, comment or docstring lines), without "
            "the model and upload-checking modules every server shares (`app/worker.py`, "
            "`app/contract.py`, `app/images.py`, `app/settings.py`; for the seed-shaped servers, "
            "`loadtest/seed/model.py` and `loadtest/seed/serving.py`).", "",
            "| server | what it is | lines of code | files |", "|---|---|---:|---|"]
    for name, info in summary.get("code_size", {}).items():
        out.append(f"| {name} | {info['description']} | {info['code_lines']} | "
                   f"{', '.join(f'`{f}`' for f in info['code_files'])} |")
    errors = [f"{name}: {info['error']}" for name, info in summary["servers"].items()
              if info.get("error")]
    errors += [f"{r.server}, {r.images_per_request} img/req, repeat {r.repeat}: {r.failures} "
               f"failed, most often `{r.top_error}`" for r in runs if r.failures]
    if errors:
        out += ["", "Errors:", ""] + [f"- {line}" for line in errors]
    return "\n".join(out) + "\n"


LOCUST_PANELS = (("images_per_s", "throughput (images/s, higher is better)"),
                 ("latency_p50_ms", "p50 latency (ms, lower is better)"),
                 ("latency_p99_ms", "p99 latency (ms, lower is better)"))
# The seed's three quantities, each a mean over runs with its std.
SEED_PANELS = (("images_per_s", "image throughput (images/s, higher is better)"),
               ("requests_per_s", "request throughput (requests/s, higher is better)"),
               ("latency_mean_ms", "latency (ms, mean per run, lower is better)"))


def chart(path: Path, aggregates: Sequence[Aggregate], title: str,
          ceiling: float | None = None,
          panels: Sequence[tuple[str, str]] = LOCUST_PANELS) -> bool:
    """Grouped bars per images-per-request setting, one panel per figure of ``panels``
    (throughput, p50 and p99 by default), std over repeats as error bars; ``ceiling`` (the
    bare model's images/s) as a dashed line on the first panel.

    Returns:
        False, drawing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    servers = list(dict.fromkeys(a.server for a in aggregates))
    settings = sorted({a.images_per_request for a in aggregates})
    by_key = {(a.server, a.images_per_request): a for a in aggregates}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.1))
    width = 0.8 / max(1, len(servers))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for index, server in enumerate(servers):
            xs, ys, errs = [], [], []
            for position, ipr in enumerate(settings):
                a = by_key.get((server, ipr))
                if a is not None and not math.isnan(getattr(a, key)):
                    xs.append(position + (index - (len(servers) - 1) / 2) * width)
                    ys.append(getattr(a, key))
                    errs.append(getattr(a, f"{key}_std"))
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=server, color=f"C{index}")
        ax.set_xticks(range(len(settings)), [str(s) for s in settings])
        ax.set_xlabel("images per request")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if ceiling:
        axes[0].axhline(ceiling, color="black", linestyle="--", linewidth=1,
                        label="bare model")
    # One legend under the panels: inside a panel it would hide the bars or the ceiling line.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def chart_title(summary: dict[str, Any]) -> str:
    config = summary["config"]
    clients = (f"{config['users']} clients x {config['requests_per_run']} requests"
               if config.get("load") == "seed" else f"{config['users']} users")
    return (f"{config['model']} on {config['device']}, {config['workers'] or 'one per GPU'} "
            f"worker(s), {clients} ({summary['environment']['date']})")


def summary_chart(path: Path, summary: dict[str, Any], aggregates: Sequence[Aggregate]) -> bool:
    """``chart`` with the title, ceiling and panels that suit the summary's load."""
    panels = SEED_PANELS if summary["config"].get("load") == "seed" else LOCUST_PANELS
    return chart(path, aggregates, chart_title(summary),
                 (summary.get("raw_model") or {}).get("best_images_per_s"), panels)


def _from_json(row_type: type, row: dict[str, Any]) -> Any:
    return row_type(**{k: math.nan if v is None else v for k, v in row.items()})


def redraw(folder: Path) -> None:
    """Rewrite ``results.md`` and ``chart.png`` of a results folder from its summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    runs = [_from_json(RunResult, r) for r in summary["runs"]]
    aggregates = [_from_json(Aggregate, a) for a in summary["aggregates"]]
    (folder / "results.md").write_text(markdown(summary, aggregates, runs))
    if not summary_chart(folder / "chart.png", summary, aggregates):
        raise SystemExit("matplotlib is not installed: pip install matplotlib")


def table(folder: Path) -> str:
    """The results table of a results folder, from its summary.json (the docs embed it)."""
    summary = json.loads((folder / "summary.json").read_text())
    aggregates = [_from_json(Aggregate, a) for a in summary["aggregates"]]
    rows: list[str] = []
    for line in markdown(summary, aggregates).splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break  # the first table only
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(Path(sys.argv[2])))
    elif len(sys.argv) == 2:
        redraw(Path(sys.argv[1]))
    else:
        raise SystemExit("usage: python -m loadtest.report [--table] RESULTS_DIR")
