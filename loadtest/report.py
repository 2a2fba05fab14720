"""What a load test's results say: the Markdown table with the targets checked, the seed's
claim checked, and the chart (the figures themselves are in ``results.py``).

``python -m loadtest.report RESULTS_DIR`` redraws ``results.md`` and ``chart.png`` from that
folder's ``summary.json``: for results made on a machine without matplotlib (the GPU
machines here have none). ``python -m loadtest.report --table RESULTS_DIR`` prints the
results table alone (the docs embed it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import Aggregate, RunResult, from_json

# The servers a spool server is measured against: ours, and the seed-shaped ones.
BASELINES = ("simple", "mp", "seed-simple", "seed-mp", "dp")
SEED_SPOOL = "seed-spool"
SEED_CLAIM = 1.3  # "about 30% higher throughput" than the other servers (the seed's README)


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
            "the model and upload-checking modules every server shares (`app/examples/`, "
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


def redraw(folder: Path) -> None:
    """Rewrite ``results.md`` and ``chart.png`` of a results folder from its summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    runs = [from_json(RunResult, r) for r in summary["runs"]]
    aggregates = [from_json(Aggregate, a) for a in summary["aggregates"]]
    (folder / "results.md").write_text(markdown(summary, aggregates, runs))
    if not summary_chart(folder / "chart.png", summary, aggregates):
        raise SystemExit("matplotlib is not installed: pip install matplotlib")


def table(folder: Path) -> str:
    """The results table of a results folder, from its summary.json (the docs embed it)."""
    summary = json.loads((folder / "summary.json").read_text())
    aggregates = [from_json(Aggregate, a) for a in summary["aggregates"]]
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
