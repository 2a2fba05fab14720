"""Several API processes in front of one machine's workers: ``API_PROCESSES=1`` against
``API_PROCESSES=2``, phases alternating, both servers up for the whole run.

1. Simulated GPUs (``app.examples.simulated_gpu:SimulatedGPU``: a batch sleeps as a ViT-L/16
   forward would on an RTX 4090, no CPU used): ``--gpus`` of them, ``--clients`` keep-alive
   connections posting one 500x375 JPEG each in a loop. Served img/s against the simulated
   capacity (every GPU busy with full batches), and the simulated GPUs' utilisation: the time
   their batches took (``FIXED_MS`` per batch plus ``PER_IMAGE_MS`` per image, counted from
   the server's ``pool_batch_size`` histogram) over the window, per GPU.
2. The echo worker (``--echo-clients`` connections, one echo worker): req/s, and the CPU
   the API processes spent per request (from /proc), the supervisor's (the pool's owner:
   its dispatcher and pool server) beside it.

    python benchmarks/multigpu_bench.py                     # the table of docs/BENCHMARKS.md
    python benchmarks/multigpu_bench.py --quick             # short phases, to check it runs
    python benchmarks/multigpu_bench.py --json out.json     # also save the figures
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.examples.simulated_gpu import FIXED_MS, PER_IMAGE_MS  # noqa: E402
from benchmarks.bench_servers import READY_TIMEOUT, app_server  # noqa: E402
from benchmarks.http_load import http_caller, run_load, sample_jpeg  # noqa: E402
from benchmarks.proc_cpu import children_running, cpu_seconds, load_average  # noqa: E402

SIMULATED = "app.examples.simulated_gpu:SimulatedGPU"
ECHO = "app.examples.echo_worker:EchoWorker"
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(url: str) -> tuple[float, float]:
    """(batches, images) so far, from the server's ``pool_batch_size`` histogram."""
    with _LOCAL.open(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    count = re.search(r"^pool_batch_size_count (\S+)$", text, re.MULTILINE)
    total = re.search(r"^pool_batch_size_sum (\S+)$", text, re.MULTILINE)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def api_processes(server_pid: int) -> list[int]:
    """The API processes of a server: its children running ``api_process``, or the server
    itself when it has none (``API_PROCESSES=1``)."""
    return children_running(server_pid, b"api_process") or [server_pid]


def cpu_of(server_pid: int) -> dict[str, float]:
    apis = api_processes(server_pid)
    return {"api": sum(cpu_seconds(pid) for pid in apis),
            "owner": 0.0 if apis == [server_pid] else cpu_seconds(server_pid)}


async def phase(name: str, server: Any, clients: int, args: argparse.Namespace,
                image: bytes) -> dict[str, Any]:
    """One load phase; what the server did inside its measurement window."""
    pid = server.process.pid

    async def window() -> dict[str, Any]:
        await asyncio.sleep(args.warmup)
        cpu0, metrics0, t0 = cpu_of(pid), await asyncio.to_thread(scrape, server.url), \
            time.monotonic()
        await asyncio.sleep(args.duration)
        cpu1, metrics1, t1 = cpu_of(pid), await asyncio.to_thread(scrape, server.url), \
            time.monotonic()
        return {"seconds": t1 - t0, "batches": metrics1[0] - metrics0[0],
                "images": metrics1[1] - metrics0[1],
                "api_cpu_s": cpu1["api"] - cpu0["api"],
                "owner_cpu_s": cpu1["owner"] - cpu0["owner"]}

    load, measured = await asyncio.gather(
        run_load(name, http_caller(server.port, image), clients, args.warmup, args.duration),
        window())
    return {"name": name, "rate": load.rate, "errors": load.errors, "p50_ms": load.p50_ms,
            "p99_ms": load.p99_ms, **measured}


def gpu_figures(p: dict[str, Any], gpus: int, batch: int) -> dict[str, float]:
    busy = p["batches"] * FIXED_MS / 1000 + p["images"] * PER_IMAGE_MS / 1000
    capacity = gpus * batch / ((FIXED_MS + batch * PER_IMAGE_MS) / 1000)
    return {"img_s": p["rate"], "capacity_img_s": capacity,
            "of_capacity": p["rate"] / capacity,
            "utilisation": busy / (gpus * p["seconds"]),
            "batch_mean": p["images"] / p["batches"] if p["batches"] else 0.0}


def echo_figures(p: dict[str, Any]) -> dict[str, float]:
    requests = p["rate"] * p["seconds"]
    return {"req_s": p["rate"], "p99_ms": p["p99_ms"],
            "api_cpu_us_per_req": 1e6 * p["api_cpu_s"] / requests if requests else 0.0,
            "api_cores": p["api_cpu_s"] / p["seconds"],
            "owner_cpu_us_per_req": 1e6 * p["owner_cpu_s"] / requests if requests else 0.0}


def alternate(servers: dict[int, Any], clients: int, args: argparse.Namespace,
              image: bytes) -> dict[int, list[dict[str, Any]]]:
    phases: dict[int, list[dict[str, Any]]] = {n: [] for n in servers}
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for n in order:
            p = asyncio.run(phase(f"API_PROCESSES={n}", servers[n], clients, args, image))
            phases[n].append(p)
            print(f"  round {round_ + 1} API_PROCESSES={n}: {p['rate']:8.1f}/s  p99 "
                  f"{p['p99_ms']:6.1f} ms  errors {p['errors']}  api cpu "
                  f"{p['api_cpu_s'] / p['seconds']:.2f} cores  owner "
                  f"{p['owner_cpu_s'] / p['seconds']:.2f} cores", flush=True)
    return phases


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = sample_jpeg()
    sides = (1, 2)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
        "load_average_before": load_average(), "rounds": args.rounds,
        "duration_s": args.duration, "simulated_gpu": {"fixed_ms": FIXED_MS,
                                                       "per_image_ms": PER_IMAGE_MS}}
    with tempfile.TemporaryDirectory(prefix="multigpu-") as logs:
        args.logs = Path(logs)
        print(f"simulated GPUs: {args.gpus} x batch {args.batch}, {args.clients} clients")
        servers = {n: app_server(args, f"gpus-{n}", args.gpus, SIMULATED, {
            "API_PROCESSES": str(n), "MAX_BATCH_SIZE": str(args.batch),
            "QUEUE_SIZE": "1024", "MAX_CONNECTIONS": "4096"}) for n in sides}
        for server in servers.values():
            server.start()
        try:
            for server in servers.values():
                server.wait_ready(READY_TIMEOUT)
            gpu = alternate(servers, args.clients, args, image)
        finally:
            for server in servers.values():
                server.stop()
        result["gpus"] = {"workers": args.gpus, "max_batch_size": args.batch,
                          "clients": args.clients,
                          "sides": {n: {"median": medians([gpu_figures(p, args.gpus,
                                                                       args.batch)
                                                           for p in gpu[n]]),
                                        "phases": gpu[n]} for n in sides}}
        print(f"echo worker: {args.echo_clients} clients")
        servers = {n: app_server(args, f"echo-{n}", 1, ECHO, {"API_PROCESSES": str(n)})
                   for n in sides}
        for server in servers.values():
            server.start()
        try:
            for server in servers.values():
                server.wait_ready(READY_TIMEOUT)
            echo = alternate(servers, args.echo_clients, args, image)
        finally:
            for server in servers.values():
                server.stop()
        result["echo"] = {"clients": args.echo_clients,
                          "sides": {n: {"median": medians([echo_figures(p) for p in echo[n]]),
                                        "phases": echo[n]} for n in sides}}
    result["load_average_after"] = load_average()
    return result


def render(result: dict[str, Any]) -> str:
    g, e = result["gpus"], result["echo"]
    gs = {int(k): v["median"] for k, v in g["sides"].items()}
    es = {int(k): v["median"] for k, v in e["sides"].items()}
    lines = [f"Simulated GPUs: {g['workers']} x max batch {g['max_batch_size']}, "
             f"{g['clients']} clients, capacity {gs[1]['capacity_img_s']:,.0f} img/s",
             "",
             "| API_PROCESSES | img/s | of capacity | GPU utilisation | mean batch |",
             "|---:|---:|---:|---:|---:|"]
    for n, m in sorted(gs.items()):
        lines.append(f"| {n} | {m['img_s']:,.0f} | {m['of_capacity']:.0%} | "
                     f"{m['utilisation']:.0%} | {m['batch_mean']:.1f} |")
    lines += ["", f"Echo worker, {e['clients']} clients:", "",
              "| API_PROCESSES | req/s | p99 | API CPU per request | API processes' cores | "
              "owner CPU per request |", "|---:|---:|---:|---:|---:|---:|"]
    for n, m in sorted(es.items()):
        lines.append(f"| {n} | {m['req_s']:,.0f} | {m['p99_ms']:.1f} ms | "
                     f"{m['api_cpu_us_per_req']:.0f} us | {m['api_cores']:.2f} | "
                     f"{m['owner_cpu_us_per_req']:.0f} us |")
    lines += ["", "| target | ratio | goal |", "|---|---:|---:|",
              f"| echo req/s, 2 / 1 | {es[2]['req_s'] / es[1]['req_s']:.2f} | >= 1.5 |",
              f"| simulated GPU utilisation, 2 / 1 | "
              f"{gs[2]['utilisation'] / gs[1]['utilisation']:.2f} | >= 1.5 |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="MAX_BATCH_SIZE")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--echo-clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--render", type=Path, help="print the table of a saved run")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 0.5, 1
        args.gpus, args.clients, args.echo_clients = 4, 64, 16
    result = run(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
