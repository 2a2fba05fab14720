"""Benchmark of the inference server against its two ceilings, in one run.

1. ViT (vit_tiny_patch16_224, CPU, 2 workers, 32 concurrent single-image clients):
   ``POST /predict`` of ``python -m app`` against the *raw ceiling*: the same worker
   processes (same worker class, configs, batching) fed by 32 concurrent submitters through
   ``SPool.async_execute``, no HTTP. Both decode, preprocess and run the model in the workers.
   Goal: server >= 0.9x raw.
2. Echo (``WORKER_CLASS=app.examples.echo_worker:EchoWorker``, 1 worker): ``POST /predict``
   of the server against two baselines in the same run: a plain FastAPI endpoint that runs
   the same checks and the same echo in-process, without a pool (goal: >= 0.5x its req/s),
   and the seed's server shape on our library: a bare FastAPI endpoint awaiting
   ``SPool.async_execute`` on a null worker (goal: >= 0.9x its req/s, p99 <= 2x its p99).
   A fourth server, the seed's shape on stateful-pool 0.3.2 (installed into ``.bench/seed``
   as ``pool_bench.py`` does), joins the rounds for the CPU table: each server's *API process*
   CPU time (all its threads, not its pool workers) over the measurement window, per request
   answered. Goals: ``/predict`` <= 1.3x the plain endpoint's CPU per request; the seed shape
   on our library <= 0.5x the same shape on 0.3.2 (what the pool's hop costs the caller).
3. Disconnect: vit_tiny on 1 CPU worker, 24 clients each sending 16 images and
   hanging up after 1 s. Reported: seconds the pool keeps working after the last client
   left (``pool_in_flight`` in ``/metrics`` back to 0). Goal: <= 1 s.
4. Overload (``--only overload``): 512 clients against vit_tiny on 2 CPU workers with
   ``REQUEST_TIMEOUT_S=5``; a 503 is retried after its ``Retry-After``. Reported: latency of
   the accepted requests (goal: p99 <= 2x the 5 s bound), of the 503s (goal: < 100 ms),
   and the 504s of requests whose deadline passed in the queue.

Each server runs in its own process (started like ``make serve``); the load comes from this
process: asyncio keep-alive connections sending one prebuilt multipart request each, so the
client costs little of the 2 shared cores. Only 127.0.0.1 is used. Baseline and server stay
up side by side and their phases alternate (baseline, server, baseline...); the table
shows the medians. The servers are in ``bench_servers.py``, the load in ``http_load.py``,
the disconnect and overload scenarios in ``server_scenarios.py``; this file runs the
comparisons and prints the table.

    python benchmarks/server_bench.py                  # every target, about 6 minutes
    python benchmarks/server_bench.py --only echo      # the echo rows and the CPU table
    python benchmarks/server_bench.py --only echo --no-seed   # without the 0.3.2 server
    python benchmarks/server_bench.py --only disconnect
    python benchmarks/server_bench.py --only overload   # 512 clients, 20 s (not in the default)
    python benchmarks/server_bench.py --quick          # seconds, to check that it runs
    python benchmarks/server_bench.py --only vit --model vit_large_patch16_224 --workers 1
    python benchmarks/server_bench.py --json results/server_bench.json
    python benchmarks/server_bench.py --cpu-workers vit_large_patch16_224   # NUM_WORKERS study
    python benchmarks/server_bench.py --cpu-workers vit_tiny_patch16_224 --quick  # 2 s timings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_servers import (  # noqa: E402
    READY_TIMEOUT,
    app_server,
    baseline_server,
    plain_app,
    seed_app,
    seed_server,
    serve,
)
from benchmarks.http_load import Phase, http_caller, pool_caller, run_load, sample_jpeg  # noqa: E402
from benchmarks.pool_bench import SEED_DIR, SEED_VERSION, ensure_seed  # noqa: E402
from benchmarks.proc_cpu import load_average  # noqa: E402
from benchmarks.server_scenarios import disconnect_scenario, overload_scenario  # noqa: E402
from loadtest import raw_model  # noqa: E402
from loadtest.processes import log_tail, logged_process  # noqa: E402
from loadtest.rounds import alternate, medians  # noqa: E402

ECHO = "app.examples.echo_worker:EchoWorker"
PLAIN, SEED_032, SEED, ECHO_SIDE = ("plain FastAPI", f"seed shape on {SEED_VERSION}",
                                    "seed shape (SPool)", "/predict echo")
# The CPU goals: /predict against the plain endpoint, the seed shape on our library against
# the same shape on 0.3.2 (at most this many times their CPU per request).
CPU_GOALS = {(ECHO_SIDE, PLAIN): 1.3, (SEED, SEED_032): 0.5}


# ---- the two comparisons ------------------------------------------------------------------

def compare_vit(args: argparse.Namespace, image: bytes) -> tuple[list[Phase], list[Phase]]:
    """Raw ceiling (pool, no HTTP) against /predict, same worker configs, phases alternating.

    Both sets of workers stay up for the whole comparison; only one is loaded at a time (an
    idle worker waits on its pipe and costs no CPU), so background load that drifts during
    the run hits both sides alike.
    """
    from app.contract import ImageInput
    from app.images import inspect_image
    from app.main import load_worker_class, plan_workers
    from app.settings import Settings
    from stateful_pool import SPool

    settings = Settings(model_name=args.model, model_weights="random", device="cpu",
                        num_workers=args.workers)
    header = inspect_image(image, max_pixels=settings.max_image_pixels)
    item = ImageInput(image, header.format, header.width, header.height, 5)
    with app_server(args, "vit", args.workers) as server, SPool(
            load_worker_class(settings.worker_class), max_batch_size=settings.max_batch_size,
            max_batch_wait=settings.max_batch_wait_ms / 1000) as pool:
        for config in plan_workers(settings):
            pool.spawn(config)
        server.wait_ready(READY_TIMEOUT)
        raw_phases, server_phases = rounds_of(args, {
            "raw pool": pool_caller(pool, item), "/predict": http_caller(server.port, image)})
    return raw_phases, server_phases


def rounds_of(args: argparse.Namespace, callers: dict[str, Any],
              cpu_pids: dict[str, int] | None = None) -> list[list[Phase]]:
    """A load phase of each caller in turn, round after round (loadtest.rounds); one list of
    phases per caller. ``cpu_pids``: by caller, the server process whose CPU to measure."""
    def phase(name: str, caller: Any) -> Callable[[int], Phase]:
        pid = (cpu_pids or {}).get(name)
        return lambda round_: asyncio.run(run_load(
            f"{name}, round {round_}", caller, args.clients, args.warmup, args.duration, pid))

    phases = alternate({name: phase(name, caller) for name, caller in callers.items()},
                       args.rounds, after_round=lambda last: report_round(*last.values()))
    return list(phases.values())


def compare_echo(args: argparse.Namespace, image: bytes) -> dict[str, list[Phase]]:
    """Plain in-process endpoint, the seed shape on 0.3.2 (unless ``--no-seed`` or it cannot
    be installed), the seed shape on our library and /predict with the echo worker, phases
    alternating; each phase also measures its server's CPU. The phases by side."""
    with ExitStack() as stack:
        servers = {PLAIN: baseline_server(args, "plain", "--serve-plain")}
        if not args.no_seed and ensure_seed():
            servers[SEED_032] = seed_server(args, "seed-shape-032", SEED_DIR)
        servers[SEED] = baseline_server(args, "seed-shape", "--serve-seed")
        servers[ECHO_SIDE] = app_server(args, "echo", args.echo_workers, ECHO)
        for each in servers.values():
            stack.enter_context(each)
        for each in servers.values():
            each.wait_ready(READY_TIMEOUT)
        pids = {name: each.process.pid for name, each in servers.items()
                if each.process is not None}
        phases = rounds_of(args, {name: http_caller(each.port, image)
                                  for name, each in servers.items()}, pids)
        return dict(zip(servers, phases, strict=True))


# ---- the CPU worker-count study (what NUM_WORKERS defaults to without a GPU) --------------

def cpu_worker_study(model: str, batch: int = 8, seconds: float = 40.0) -> None:
    """One worker with every core against one 1-thread worker per core, run at once.

    Each worker is a ``loadtest.raw_model`` process timing the bare forward pass (fp32, no
    decode) as a server worker runs it, with the threads it gets under ``NUM_WORKERS``.
    """
    cpus = len(os.sched_getaffinity(0))

    def together(workers: int) -> float:
        """img/s of ``workers`` raw_model processes started at once, summed."""
        with tempfile.TemporaryDirectory(prefix="cpu_workers-") as tmp, ExitStack() as stack:
            outputs = [Path(tmp) / f"worker{i}.json" for i in range(workers)]
            processes = [stack.enter_context(logged_process(
                raw_model.command_line(model, out, device="cpu", batch_sizes=[batch],
                                       seconds=seconds, workers=workers),
                out.with_suffix(".log"))) for out in outputs]
            deadline = time.monotonic() + 10 * seconds + 120
            for process, out in zip(processes, outputs, strict=True):
                code = process.wait(max(0.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"raw_model exited with {code}:\n"
                                       f"{log_tail(out.with_suffix('.log'))}")
            return sum(float(json.loads(out.read_text())["images_per_s_by_batch"][str(batch)])
                       for out in outputs)

    one = together(1)
    many = together(cpus)
    print(f"{model}, batch {batch}, {cpus} cpus: 1 worker x {cpus} threads {one:.2f} img/s; "
          f"{cpus} workers x 1 thread {many:.2f} img/s together")


def report_round(*phases: Phase) -> None:
    for p in phases:
        cpu = p.cpu_us_per_request
        print(f"  {p.name:28s} {p.rate:8.1f}/s  p50 {p.p50_ms:7.1f} ms  p99 {p.p99_ms:7.1f} ms"
              f"  errors {p.errors}" + ("" if cpu is None else f"  API CPU {cpu:5.0f} us/req"),
              flush=True)
    print(f"  load average {load_average()}", flush=True)


def cpu_table(sides: dict[str, list[Phase]]) -> dict[str, Any]:
    """Each side's medians (req/s, p99, API process CPU per request), the ratios of CPU per
    request against the plain endpoint and against the seed shape on 0.3.2, and the goals."""
    figures = {name: medians([p.figures() for p in phases]) for name, phases in sides.items()}
    cpu = {name: f.get("cpu_us_per_request") for name, f in figures.items()}

    def ratio(side: str, base: str) -> float | None:
        mine, theirs = cpu.get(side), cpu.get(base)
        return None if mine is None or not theirs else mine / theirs

    return {
        "sides": {name: {"rate": f["rate"], "p99_ms": f["p99_ms"],
                         "cpu_us_per_request": cpu[name],
                         "cpu_vs_plain": ratio(name, PLAIN),
                         "cpu_vs_seed_032": ratio(name, SEED_032)}
                  for name, f in figures.items()},
        "goals": [{"side": side, "baseline": base, "ratio": ratio(side, base), "goal": goal}
                  for (side, base), goal in CPU_GOALS.items()],
        "hop": hop_costs(cpu),
        "load_average": load_average()}


def hop_costs(cpu: dict[str, float | None]) -> dict[str, float | None]:
    """The pool hop's share of the seed shape's CPU per request: the seed shape less the plain
    endpoint (the same FastAPI route with the work done in process), on each library."""
    plain = cpu.get(PLAIN)
    hops: dict[str, float | None] = {}
    for side, name in ((SEED, "ours_us"), (SEED_032, "seed_032_us")):
        mine = cpu.get(side)
        hops[name] = None if mine is None or plain is None else mine - plain
    ours, theirs = hops["ours_us"], hops["seed_032_us"]
    hops["ratio"] = None if ours is None or not theirs or theirs <= 0 else ours / theirs
    return hops


def print_cpu_table(table: dict[str, Any]) -> None:
    def cell(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    print("\n| server | req/s | p99 | API CPU per request | vs plain | vs seed shape on "
          f"{SEED_VERSION} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, side in table["sides"].items():
        print(f"| {name} | {side['rate']:.1f} | {side['p99_ms']:.1f} ms | "
              f"{cell(side['cpu_us_per_request'], '.0f')} us | "
              f"{cell(side['cpu_vs_plain'], '.2f')} | {cell(side['cpu_vs_seed_032'], '.2f')} |")
    for goal in table["goals"]:
        if goal["ratio"] is not None:
            met = "met" if goal["ratio"] <= goal["goal"] else "missed"
            print(f"API CPU per request, {goal['side']} / {goal['baseline']}: "
                  f"{goal['ratio']:.2f} (goal <= {goal['goal']:g}, {met})")
    hop = table.get("hop") or {}
    if hop.get("ours_us") is not None:
        line = f"pool hop (seed shape less plain FastAPI): ours {hop['ours_us']:.0f} us"
        if hop.get("seed_032_us") is not None:
            line += f", {SEED_VERSION} {hop['seed_032_us']:.0f} us"
        if hop.get("ratio") is not None:
            line += f", ratio {hop['ratio']:.2f}"
        print(line)
    print(f"load average at the end: {table['load_average']}")


@dataclass
class Row:
    target: str
    baseline: str
    base: list[Phase]
    cand: list[Phase]
    goal: float
    p99_goal: float | None = None

    def as_json(self) -> dict[str, Any]:
        base = medians([p.figures() for p in self.base])
        cand = medians([p.figures() for p in self.cand])
        return {"target": self.target, "baseline": self.baseline,
                "baseline_rate": base["rate"], "server_rate": cand["rate"],
                "ratio": cand["rate"] / base["rate"], "goal": self.goal,
                "baseline_p99_ms": base["p99_ms"], "server_p99_ms": cand["p99_ms"],
                "p99_ratio": cand["p99_ms"] / base["p99_ms"], "p99_goal": self.p99_goal,
                "phases": [{**asdict(p), "rate": p.rate,
                            "cpu_us_per_request": p.cpu_us_per_request}
                           for p in self.base + self.cand]}


def run(args: argparse.Namespace) -> None:
    """Every comparison asked for, then the table."""
    image = sample_jpeg()
    print(f"image: 500x375 JPEG, {len(image)} bytes; {args.clients} clients, "
          f"{args.duration:g} s per phase after {args.warmup:g} s warm-up, {args.rounds} "
          f"round(s); cpus: {len(os.sched_getaffinity(0))}; load average {load_average()}",
          flush=True)
    rows: list[Row] = []
    cpu = None
    if args.only in (None, "vit"):
        print(f"ViT: {args.model}, {args.workers} CPU worker(s)", flush=True)
        raw, served = compare_vit(args, image)
        rows.append(Row(f"{args.model}, {args.workers} CPU workers, {args.clients} clients",
                        "raw pool (no HTTP) img/s", raw, served, 0.9))
    if args.only in (None, "echo"):
        print(f"echo: {args.echo_workers} worker(s)", flush=True)
        sides = compare_echo(args, image)
        target = f"echo worker, {args.clients} clients"
        rows.append(Row(target, "plain FastAPI req/s", sides[PLAIN], sides[ECHO_SIDE], 0.5))
        rows.append(Row(target, "seed shape on SPool req/s", sides[SEED], sides[ECHO_SIDE],
                        0.9, 2.0))
        cpu = cpu_table(sides)
    disconnect = None
    if args.only in (None, "disconnect"):
        print(f"disconnect: {args.model}, 1 CPU worker, 24 clients x 16 images, each "
              "leaving after 1 s", flush=True)
        disconnect = disconnect_scenario(args, image)

    overload = None
    if args.only == "overload":  # not in the default run: 20 s of 512 clients
        print(f"overload: {args.model}, {args.workers} CPU workers, 512 clients, "
              "REQUEST_TIMEOUT_S=5", flush=True)
        overload = overload_scenario(args, image).summary()

    if rows:
        print("\n| target | baseline | baseline /s | /predict /s | ratio | goal "
              "| baseline p99 | /predict p99 | p99 ratio |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        r = row.as_json()
        p99_goal = "" if row.p99_goal is None else f" (goal <= {row.p99_goal:g})"
        print(f"| {row.target} | {row.baseline} | {r['baseline_rate']:.1f} | "
              f"{r['server_rate']:.1f} | {r['ratio']:.2f} | >= {row.goal} | "
              f"{r['baseline_p99_ms']:.1f} ms | {r['server_p99_ms']:.1f} ms | "
              f"{r['p99_ratio']:.2f}{p99_goal} |")
    if cpu is not None:
        print_cpu_table(cpu)
    if disconnect is not None:
        print(f"\ndisconnect: after the last client left, the queue was empty in "
              f"{disconnect[0]:.2f} s and the pool idle in {disconnect[1]:.2f} s "
              "(goal <= 1 s)")
    if overload is not None:
        print("\noverload: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in overload.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"command": " ".join(["python", *sys.argv]),
             "rows": [row.as_json() for row in rows], "api_cpu": cpu, "overload": overload,
             "disconnect_queue_empty_after_s": None if disconnect is None else disconnect[0],
             "disconnect_idle_after_s": None if disconnect is None else disconnect[1]},
            indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-seed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["vit", "echo", "disconnect", "overload"])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--workers", type=int, default=2, help="ViT workers (CPU)")
    parser.add_argument("--echo-workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny phases, to check it runs")
    parser.add_argument("--no-seed", action="store_true",
                        help=f"no echo-comparison server on stateful-pool {SEED_VERSION}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-workers", metavar="MODEL",
                        help="only compare 1 CPU worker with all threads against N 1-thread ones")
    args = parser.parse_args()
    if args.serve_plain or args.serve_seed:
        serve(plain_app() if args.serve_plain else seed_app())
        return
    if args.cpu_workers:
        cpu_worker_study(args.cpu_workers, seconds=2.0 if args.quick else 40.0)
        return
    if args.quick:
        args.duration, args.warmup, args.rounds, args.clients = 1.0, 0.25, 1, 8
    with tempfile.TemporaryDirectory(prefix="server_bench-") as logs:
        args.logs = Path(logs)  # the servers' logs; an error about a server shows its tail
        run(args)


if __name__ == "__main__":
    main()
