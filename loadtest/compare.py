"""``python -m loadtest.compare``: the seed's benchmark, rerun on this machine.

Start every server on a free 127.0.0.1 port, wait until all its workers are ready, warm it
up; then run locust headless once per (repeat, images per request, server), the servers
taking turns so that load from elsewhere on the machine spreads over all of them
(``--sequential``: one server at a time, for GPUs that cannot hold every server's model).
Stop every server (SIGTERM, then SIGKILL past a deadline). Then write, in one folder::

    raw/                 locust's JSON, CSV and log of every run; each server's log
    summary.json         configuration, machine, code size, every run, mean/std per setting
    summary.csv          mean/std per (server, images per request)
    runs.csv             one row per locust run
    results.md           the Markdown table, with the targets of docs/LOADTEST.md checked
    chart.png            throughput, p50 and p99 per server, error bars = std over repeats

Presets: ``--preset cpu`` (default; a few minutes on 2 cores), ``--preset gpu`` (our servers
at the seed's scale: ViT-L/16, a worker per GPU, 100 users, 1-32 images per request, 5
repeats) and ``--preset seed`` (the seed's benchmark as it was run: its four servers in
``loadtest/seed/``, torchvision's ViT-L/16, 64 requests per run from 16 blocking client
processes, uni-colour 224x224 PNGs, 5 runs per setting, one server at a time; see
docs/LOADTEST.md). Every knob of a preset can be overridden. Exit code 0 when every server
ran and no request failed, 1 otherwise.

The presets and the command line are in ``presets.py``; the servers and the runs against
them in ``session.py``; the figures in ``results.py``, the table and chart in ``report.py``.
This module runs one comparison from start to files.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import raw_model, report, results
from .images import Upload, load_images, parse_size
from .presets import parse_args
from .processes import ROOT
from .seed import client as seed_client
from .seed.model import split_model_name
from .servers import server_specs
from .session import Session


def server_env(args: argparse.Namespace, largest_upload: int) -> dict[str, str]:
    """The settings every server reads (app.settings.Settings), sized for this load."""
    most = max(args.images_per_request)
    library, name = split_model_name(args.model)
    env = {
        # app/ takes bare timm names; the seed-shaped servers take both forms.
        "MODEL_NAME": name if library == "timm" else args.model,
        "MODEL_WEIGHTS": args.weights, "DEVICE": args.device,
        "PRECISION": args.precision, "LOG_LEVEL": "warning", "API_KEY": "",
        # app/ answers 503 when its queue is full and 413 above MAX_FILES; the load must
        # never hit those limits, or the comparison would measure refusals.
        "QUEUE_SIZE": str(max(256, args.users * most)),
        "MAX_FILES": str(max(16, most)),
        "MAX_UPLOAD_MB": str(max(20, math.ceil(2 * most * largest_upload / 2**20))),
    }
    if args.workers:
        env["NUM_WORKERS"] = str(args.workers)
    return env


def measure_raw_model(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """The bare model's best throughput, in a subprocess (torch and CUDA die with it)."""
    command = raw_model.command_line(
        args.model, output, device=args.device, precision=args.precision,
        batch_sizes=args.raw_batch_sizes, seconds=args.raw_seconds, workers=args.workers or 0)
    return raw_model.run_child(command, output,
                               timeout=args.ready_timeout + 10 * len(args.raw_batch_sizes))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def accelerator(device: str) -> str:
    if device == "cpu":
        return "no GPU used"
    try:
        import torch

        count = torch.cuda.device_count()
        return f"{count} x {torch.cuda.get_device_name(0)}" if count else "no GPU visible"
    except ImportError:
        return "torch not installed"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop_on_sigterm(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    # The servers run in sessions of their own, out of reach of a signal to this process's
    # group: a SIGTERM must unwind through the `finally` that stops them, not just end us.
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return compare(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def compare(args: argparse.Namespace) -> int:
    raw = args.output / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    specs = server_specs(args.max_batch_size, args.max_batch_wait_ms)
    uploads: list[Upload] = load_images(args.image_kind, parse_size(args.image_size),
                                        args.image_dir)
    env = server_env(args, max(len(u.data) for u in uploads))
    total_runs = len(args.servers) * len(args.images_per_request) * args.repeats
    per_run = (f"{args.requests} requests from {args.users} client processes"
               if args.load == "seed" else f"{args.users} users, {args.duration:g} s")
    print(f"loadtest: preset {args.preset}, servers {', '.join(args.servers)}, {per_run} x "
          f"{args.repeats} repeat(s) x images/request {args.images_per_request} = "
          f"{total_runs} runs; results in {args.output}", flush=True)

    summary: dict[str, Any] = {
        "config": {
            "preset": args.preset, "servers": args.servers, "model": args.model,
            "weights": args.weights, "device": args.device, "workers": args.workers,
            "precision": args.precision, "load": args.load, "users": args.users,
            "duration_s": args.duration if args.load == "locust" else None,
            "requests_per_run": args.requests if args.load == "seed" else None,
            "client": seed_client.client_library() if args.load == "seed" else "locust",
            "repeats": args.repeats, "images_per_request": args.images_per_request,
            "max_batch_size": args.max_batch_size, "max_batch_wait_ms": args.max_batch_wait_ms,
            "schedule": "sequential" if args.sequential else "interleaved",
            "raw_batch_sizes": args.raw_batch_sizes if args.raw_model else None,
            "image_source": args.image_dir or (
                f"uni-colour {args.image_size} PNGs" if args.image_kind == "uni-colour"
                else f"generated JPEG {args.image_size}"),
            "server_env": env,
        },
        "environment": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "accelerator": accelerator(args.device),
            "python": platform.python_version(), "git_commit": git_commit(),
            "load_average_before": load_average(),
        },
        "servers": {name: {"description": specs[name].description,
                           "command": f"python -m {specs[name].module}",
                           "env": specs[name].env}
                    for name in args.servers},
        # Every known server, run or not: the seed reported code size beside the benchmark.
        "code_size": {name: {"description": spec.description,
                             "code_files": list(spec.code_files),
                             "code_lines": sum(results.code_lines(ROOT / f)
                                               for f in spec.code_files)}
                      for name, spec in specs.items()},
    }
    if args.raw_model:
        summary["raw_model"] = measure_raw_model(args, raw / "raw_model.json")
        rm = summary["raw_model"]
        print(f"  raw model: {rm.get('best_images_per_s')} img/s at batch "
              f"{rm.get('best_batch_size')} ({rm.get('scope') or rm.get('error')})", flush=True)
    session = Session(args, env, uploads, summary["servers"], raw)
    try:
        if args.sequential:
            for name in args.servers:
                session.launch(name)
                if session.bring_up(name):
                    for ipr in args.images_per_request:
                        for repeat in range(1, args.repeats + 1):
                            session.measure(name, ipr, repeat)
                session.shut_down(name)
        else:
            # Every server loads its model at once: on a GPU box with many cores that saves
            # minutes of ViT-L/16 loading; the load runs only start once all are ready.
            for name in args.servers:
                session.launch(name)
            for name in args.servers:
                session.bring_up(name)
            for repeat in range(1, args.repeats + 1):
                # Each repeat is one round over every server, in a rotated order: a burst of
                # load from elsewhere on the machine then hits every server about equally.
                shift = (repeat - 1) % len(args.servers)
                order = args.servers[shift:] + args.servers[:shift]
                for ipr in args.images_per_request:
                    for name in order:
                        if name in session.up:
                            session.measure(name, ipr, repeat)
    finally:
        session.shut_down_all()
    runs = session.runs

    summary["environment"]["load_average_after"] = load_average()
    summary["environment"]["elapsed_s"] = round(time.monotonic() - session.started, 1)
    aggregates = results.aggregate(runs)
    summary["runs"] = [asdict(r) for r in runs]
    summary["aggregates"] = [asdict(a) for a in aggregates]
    summary["verdicts"] = report.verdicts(aggregates, summary.get("raw_model"),
                                          gpu=args.device != "cpu")
    results.write_json(args.output / "summary.json", summary)
    results.write_csv(args.output / "summary.csv", aggregates, results.Aggregate)
    results.write_csv(args.output / "runs.csv", runs, results.RunResult)
    table = report.markdown(summary, aggregates, runs)
    (args.output / "results.md").write_text(table)
    if not report.summary_chart(args.output / "chart.png", summary, aggregates):
        print("  chart.png skipped: matplotlib is not installed (draw it later with "
              f"`python -m loadtest.report {args.output}`)", flush=True)
    print(table, flush=True)
    failed = sum(r.failures for r in runs)
    broken = [n for n in args.servers if summary["servers"][n].get("error")]
    silent = [n for n in args.servers if not any(r.server == n and r.requests for r in runs)]
    print(f"loadtest: {len(runs)} runs in {summary['environment']['elapsed_s']:.0f} s, "
          f"{failed} failed request(s), servers in error: {broken or 'none'}; "
          f"wrote {args.output}", flush=True)
    return 1 if failed or broken or silent else 0


if __name__ == "__main__":
    sys.exit(main())
