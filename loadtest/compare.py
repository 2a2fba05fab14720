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
"""

from __future__ import annotations

import argparse
import json
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
from .images import IMAGE_KINDS, Upload, load_images, parse_size, request_bodies
from .processes import ROOT, log_tail, run_logged
from .seed import client as seed_client
from .seed.model import split_model_name
from .servers import ServerError, ServerProcess, server_specs

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_SERVERS = ("simple", "mp", "spool", "spool-batch")
SEED_SERVERS = ("seed-simple", "seed-mp", "seed-spool", "dp")
# What our presets share: locust drives the load for --duration seconds per run.
LOCUST_LOAD = dict(servers=DEFAULT_SERVERS, load="locust", requests=64, image_kind="photo",
                   image_size="320x240", raw_model=True, sequential=False, run_timeout=600.0)

PRESETS: dict[str, dict[str, Any]] = {
    # About 7 minutes on 2 cores: 4 servers x 2 settings x 3 repeats x (15 s + locust start)
    # plus 4 server starts.
    "cpu": dict(LOCUST_LOAD, model="vit_tiny_patch16_224", weights="random", device="cpu",
                workers=2, precision="fp32", users=32, duration=15, repeats=3,
                images_per_request=[1, 4], max_batch_size=16, max_batch_wait_ms=0.0,
                ready_timeout=180, raw_batch_sizes=[1, 8, 16]),
    # Our servers at the seed's scale: ViT-L/16 (timm), one worker per GPU, 100 users (the
    # seed README's figure), 5 repeats. Random weights: throughput does not depend on them,
    # and no download is needed.
    "gpu": dict(LOCUST_LOAD, model="vit_large_patch16_224", weights="random", device="cuda",
                workers=0, precision="fp32", users=100, duration=60, repeats=5,
                images_per_request=[1, 4, 8, 16, 32], max_batch_size=32,
                max_batch_wait_ms=0.0, ready_timeout=600, raw_batch_sizes=[1, 8, 32, 64, 128]),
    # stateful-pool 0.3.2's benchmark as its code ran it: its servers and model (torchvision
    # vit_l_16, random weights after manual_seed(42), fp32), 64 requests per run from 16
    # blocking client processes, uni-colour 224x224 PNGs, 5 runs per setting, one server at
    # a time. No bare-model timing: the seed had none, and raw_model.py times timm models.
    "seed": dict(model="torchvision:vit_l_16", weights="random", device="cuda", workers=0,
                 precision="fp32", servers=SEED_SERVERS, load="seed", users=16, requests=64,
                 duration=60, repeats=5, images_per_request=[1, 4, 8, 16, 32],
                 image_kind="uni-colour", image_size="224x224", raw_model=False,
                 sequential=True, max_batch_size=32, max_batch_wait_ms=0.0, ready_timeout=600,
                 raw_batch_sizes=[1, 8, 32, 64, 128], run_timeout=600.0),
}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,8, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    knobs = parser.add_argument_group("overrides of the preset (default: the preset's value)")
    knobs.add_argument("--servers", help="comma-separated, from: " + ", ".join(
        server_specs(1, 0)) + " (cpu, gpu: " + ",".join(DEFAULT_SERVERS) + "; seed: "
        + ",".join(SEED_SERVERS) + ")")
    knobs.add_argument("--model", help="a timm name (timm:NAME also works), or "
                       "torchvision:NAME for the seed-shaped servers only (cpu: "
                       "vit_tiny_patch16_224, gpu: vit_large_patch16_224 from timm, seed: "
                       "torchvision:vit_l_16)")
    knobs.add_argument("--weights", help="random | auto | pretrained | checkpoint path")
    knobs.add_argument("--device", choices=("cpu", "cuda", "auto"))
    knobs.add_argument("--workers", type=int, help="model workers (0: one per GPU)")
    knobs.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    knobs.add_argument("--load", choices=("locust", "seed"),
                       help="locust: users for --duration seconds; seed: --requests requests "
                       "from --users blocking client processes (loadtest/seed/client.py)")
    knobs.add_argument("--users", type=int,
                       help="concurrent closed-loop clients (locust users or client processes)")
    knobs.add_argument("--duration", type=float, help="seconds per locust run")
    knobs.add_argument("--requests", type=int, help="requests per run of the seed's load")
    knobs.add_argument("--run-timeout", type=float,
                       help="seconds a run of the seed's load may take before it is killed")
    knobs.add_argument("--repeats", type=int, help="runs per (server, images per request)")
    knobs.add_argument("--images-per-request", type=int_list, help="e.g. 1,4,8")
    knobs.add_argument("--max-batch-size", type=int, help="spool-batch's MAX_BATCH_SIZE")
    knobs.add_argument("--max-batch-wait-ms", type=float, help="spool-batch's MAX_BATCH_WAIT_MS")
    knobs.add_argument("--ready-timeout", type=float, help="seconds to wait for every worker")
    knobs.add_argument("--raw-batch-sizes", type=int_list,
                       help="batch sizes at which to time the bare model (the ceiling row)")
    knobs.add_argument("--raw-model", action=argparse.BooleanOptionalAction,
                       help="time the bare model's forward pass first (no HTTP, no decoding; "
                       "timm models only)")
    parser.add_argument("--raw-seconds", type=float, default=3.0,
                        help="seconds of forward passes per raw batch size")
    knobs.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                       help="run one server at a time (all of one server's runs, then the "
                       "next; the seed preset's way) instead of keeping every server up and "
                       "interleaving the runs; also for GPUs without memory for every "
                       "server's model at once")
    parser.add_argument("--image-dir", default="", help="post these images, not generated ones")
    knobs.add_argument("--image-kind", choices=IMAGE_KINDS,
                       help="generated images: noisy gradient JPEGs or one-colour PNGs")
    knobs.add_argument("--image-size", help="WxH of generated images")
    parser.add_argument("--output", type=Path,
                        help="results folder (default: results/loadtest/<preset>-<time>)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.servers, str):
        args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.servers = list(args.servers)
    known = server_specs(args.max_batch_size, args.max_batch_wait_ms)
    unknown = [s for s in args.servers if s not in known]
    if unknown or not args.servers:
        parser.error(f"unknown server(s) {unknown}; choose from {', '.join(known)}")
    for name in ("users", "repeats", "max_batch_size", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.run_timeout <= 0:
        parser.error("--duration and --run-timeout must be > 0")
    try:
        parse_size(args.image_size)
        library, _ = split_model_name(args.model)
    except ValueError as exc:
        parser.error(str(exc))
    timm_only = [s for s in args.servers if not known[s].seed_model]
    if library == "torchvision" and (timm_only or args.raw_model):
        parser.error(f"{args.model} is a torchvision model, but "
                     f"{', '.join(timm_only) or 'the bare-model timing'} load timm models only: "
                     "give a timm name (vit_large_patch16_224 is ViT-L/16) or leave them out "
                     "(--servers, --no-raw-model)")
    seed_shaped = [s for s in args.servers if known[s].seed_model]
    if seed_shaped and args.precision != "fp32":
        parser.error(f"{', '.join(seed_shaped)} run fp32 only, as the seed did; "
                     f"drop --precision {args.precision} or those servers")
    if args.output is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        args.output = ROOT / "results" / "loadtest" / f"{args.preset}-{stamp}"
    return args


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


def run_locust(url: str, ipr: int, args: argparse.Namespace,
               prefix: Path) -> tuple[list[Any], dict[str, Any]]:
    """One headless locust run in its own process group.

    Returns:
        ``(stats, run_info)``: locust's JSON stats entries, and the locustfile's
        ``{"stopped_at": ..., "errors": {error: occurrences}}``.
    """
    # A bound on requests too, for a server that fails fast: 100 requests/s per user is far
    # above what any model server here answers.
    max_requests = int(args.users * args.duration * 100)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        # -r is users started per second: at -r = -u the last user starts a second late, and
        # --reset-stats (which drops the ramp) would cut that second off a short run.
        "-u", str(args.users), "-r", str(10 * args.users), "-t", f"{args.duration:g}s",
        "--host", url, "--reset-stats", "--only-summary", "--loglevel", "WARNING",
        "--json-file", str(prefix), "--csv", str(prefix),
        "--images-per-request", str(ipr), "--image-size", args.image_size,
        "--max-requests", str(max_requests), "--run-info", f"{prefix}_info.json",
    ]
    if args.image_dir:
        command += ["--image-dir", str(args.image_dir)]
    log_path = prefix.with_suffix(".log")
    try:
        returncode = run_logged(command, log_path, timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        raise ServerError(f"locust did not finish within {args.duration + 60:g} s") from None
    # 1 means "some request failed", which the stats report; anything else is locust's own.
    json_path = prefix.parent / f"{prefix.name}.json"
    if returncode not in (0, 1) or not json_path.exists():
        raise ServerError(f"locust exited with {returncode}:\n{log_tail(log_path)}")
    info_path = prefix.parent / f"{prefix.name}_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return json.loads(json_path.read_text()), info


def run_seed_client(url: str, ipr: int, args: argparse.Namespace, prefix: Path) -> Any:
    """One run of the seed's load (``loadtest.seed.client``) in its own process group.

    Returns:
        The client's JSON: request count, failures, wall time, every latency.
    """
    output = prefix.parent / f"{prefix.name}.json"
    command = [sys.executable, "-m", "loadtest.seed.client", "--url", f"{url}/predict",
               "--images-per-request", str(ipr), "--requests", str(args.requests),
               "--clients", str(args.users), "--image-kind", args.image_kind,
               "--image-size", args.image_size, "--timeout", f"{args.run_timeout:g}",
               "--output", str(output)]
    if args.image_dir:
        command += ["--image-dir", str(args.image_dir)]
    log_path = prefix.parent / f"{prefix.name}.log"
    try:
        returncode = run_logged(command, log_path, timeout=args.run_timeout + 30)
    except subprocess.TimeoutExpired:
        raise ServerError(f"the seed client did not finish within "
                          f"{args.run_timeout + 30:g} s") from None
    # 1 means "some request failed", which the JSON reports.
    if returncode not in (0, 1) or not output.exists():
        raise ServerError(f"the seed client exited with {returncode}:\n{log_tail(log_path)}")
    return json.loads(output.read_text())


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


class Session:
    """The servers of one comparison, the runs made so far, and what is known of each server
    (``info``: the summary's ``servers`` entries, filled in as they start, run and stop)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], uploads: list[Upload],
                 info: dict[str, dict[str, Any]], raw: Path) -> None:
        self.args, self.env, self.uploads, self.info, self.raw = args, env, uploads, info, raw
        self.specs = server_specs(args.max_batch_size, args.max_batch_wait_ms)
        self.up: dict[str, ServerProcess] = {}
        self.launched_at: dict[str, float] = {}
        self.runs: list[results.RunResult] = []
        self.total = len(args.servers) * len(args.images_per_request) * args.repeats
        self.started = time.monotonic()

    def launch(self, name: str) -> None:
        """Start a server process; return at once (its model loads in the background)."""
        server = ServerProcess(self.specs[name], self.env, self.raw / f"{name}.server.log")
        self.up[name] = server
        self.launched_at[name] = time.monotonic()
        server.start()

    def bring_up(self, name: str) -> bool:
        """Wait for all the workers of a launched server, warm it up; False (and noted) on
        error."""
        info, server = self.info[name], self.up[name]
        try:
            readiness = server.wait_ready(self.args.ready_timeout)
            info["ready_after_s"] = round(time.monotonic() - self.launched_at[name], 1)
            info["workers"] = workers = int(readiness.get("workers") or 1)
            for ipr in self.args.images_per_request:
                server.warm_up(request_bodies(self.uploads, ipr, variants=4 * workers),
                               expected=ipr, concurrency=2 * workers)
        except ServerError as exc:
            self.fail(name, exc)
            return False
        print(f"  {name}: ready with {workers} worker(s) {info['ready_after_s']} s after its "
              "start", flush=True)
        return True

    def measure(self, name: str, ipr: int, repeat: int) -> None:
        """One run of the load against a running server, with its progress line."""
        prefix = self.raw / f"{name}_ipr{ipr}_r{repeat}"
        try:
            if self.args.load == "seed":
                client = run_seed_client(self.up[name].url, ipr, self.args, prefix)
                run = results.seed_run_result(client, server=name, repeat=repeat,
                                             load_average_1m=os.getloadavg()[0])
            else:
                stats, run_info = run_locust(self.up[name].url, ipr, self.args, prefix)
                run = results.run_result(
                    stats, run_info, server=name, images_per_request=ipr, repeat=repeat,
                    planned_duration_s=self.args.duration, load_average_1m=os.getloadavg()[0])
        except ServerError as exc:
            self.fail(name, exc)
            return
        self.runs.append(run)
        print(f"[{len(self.runs)}/{self.total}] {name} {ipr} img/req repeat {repeat}: "
              f"{run.images_per_s:.1f} img/s, {run.requests_per_s:.1f} req/s, "
              f"p50 {run.latency_p50_ms:.0f} ms, p99 {run.latency_p99_ms:.0f} ms, "
              f"{run.failures}/{run.requests} failed "
              f"({time.monotonic() - self.started:.0f} s elapsed)", flush=True)
        if run.top_error:
            print(f"    most frequent failure: {run.top_error}", flush=True)

    def fail(self, name: str, exc: ServerError) -> None:
        """Note the error and stop the server: its remaining runs are skipped."""
        self.info[name].setdefault("error", str(exc).splitlines()[0])
        print(f"  {name}: ERROR {exc}", flush=True)
        self.shut_down(name)

    def shut_down(self, name: str) -> None:
        server = self.up.pop(name, None)
        if server is None:
            return
        returncode, leftovers = server.stop()
        self.info[name]["exit_code"] = returncode
        if leftovers:
            self.info[name]["killed_leftover_pids"] = leftovers
            print(f"  {name}: killed {len(leftovers)} process(es) left after its exit",
                  flush=True)


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
        for name in list(session.up):
            session.shut_down(name)
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
