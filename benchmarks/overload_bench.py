"""Overload: the same server at 32 connections, then at 512, in one run.

vit_tiny_patch16_224 (random weights) on 2 CPU workers, ``REQUEST_TIMEOUT_S=5``, started as
``make serve`` starts it. Each connection posts one 500x375 JPEG in a closed loop; a 503 is
retried after its ``Retry-After`` (a polite client; the sleep is cut at the phase's end).
Per phase: answers by status, successful req/s (answers inside the phase's window), latency
of the accepted requests and of the 503s, and the CPU each process took (from /proc: the
load generator is this process, the API process, the workers), as a share of one core.

Targets (same-run ratios; the machine's load is printed before and after):
  504s <= 1% of answers at 512; accepted p99 <= REQUEST_TIMEOUT_S; successful req/s at 512
  >= 0.5x that at 32; 503 p99 < 100 ms.

    python benchmarks/overload_bench.py                      # 2 x 20 s, about 1 minute
    python benchmarks/overload_bench.py --quick              # 2 x 5 s
    python benchmarks/overload_bench.py --json docs/bench/overload_bench-DATE.json
    python benchmarks/overload_bench.py --worker echo --item-sleep 0.04   # no model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_servers import READY_TIMEOUT, app_server  # noqa: E402
from benchmarks.http_load import multipart_request, read_answer, sample_jpeg  # noqa: E402
from benchmarks.proc_cpu import load_average, reading, shares  # noqa: E402

SLEEPY = "benchmarks.overload_bench:SleepyEchoWorker"


@dataclass
class Answers:
    """What one phase's clients got: (when answered, status, seconds) per answer."""

    clients: int
    seconds: float
    answers: list[tuple[float, int, float]] = field(default_factory=list)
    broken: int = 0  # connections that failed or closed mid-request (reconnected)
    cpu: dict[str, float] = field(default_factory=dict)

    def of(self, status: int) -> list[float]:
        return sorted(s for _, status_, s in self.answers if status_ == status)

    def summary(self, timeout_s: float) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

        ok, refused, expired = self.of(200), self.of(503), self.of(504)
        total = len(self.answers)
        in_window = sum(1 for t, status, _ in self.answers if status == 200 and t <= self.seconds)
        return {
            "clients": self.clients, "seconds": self.seconds, "answers": total,
            "ok": len(ok), "ok_per_s": in_window / self.seconds,
            "ok_p50_s": q(ok, 0.5), "ok_p99_s": q(ok, 0.99), "ok_max_s": q(ok, 1.0),
            "refused_503": len(refused), "refused_p50_ms": q(refused, 0.5) * 1e3,
            "refused_p99_ms": q(refused, 0.99) * 1e3, "refused_max_ms": q(refused, 1.0) * 1e3,
            # Without the opening burst (every connection's first request at once).
            "refused_p99_after_1s_ms": q(sorted(
                s for t, status, s in self.answers if status == 503 and t - s > 1.0),
                0.99) * 1e3,
            "expired_504": len(expired), "expired_share": len(expired) / total if total else 0,
            "other_status": total - len(ok) - len(refused) - len(expired),
            "broken_connections": self.broken, "request_timeout_s": timeout_s,
            # When in the phase the 504s came (seconds): a burst at the start, or all along.
            "expired_at_s": sorted(round(t - s, 1) for t, status, s in self.answers
                                   if status == 504),
            "cpu_cores": {k: round(v, 3) for k, v in self.cpu.items()}}


async def closed_loop(port: int, request: bytes, clients: int, duration: float) -> Answers:
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration
    result = Answers(clients, duration)

    async def one_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = loop.time()
        writer.write(request)
        status, retry = await read_answer(reader)
        now = loop.time()
        result.answers.append((now - start, status, now - t0))
        if status == 503:
            await asyncio.sleep(min(retry, max(0.0, end - now)))

    async def client() -> None:
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                while loop.time() < end:
                    await one_call(reader, writer)
                writer.close()
            except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
                result.broken += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return result


def phase(server: Any, request: bytes, clients: int, duration: float) -> Answers:
    assert server.process is not None
    before, t0 = reading(server.process.pid), time.monotonic()
    answers = asyncio.run(closed_loop(server.port, request, clients, duration))
    answers.cpu = shares(before, reading(server.process.pid), time.monotonic() - t0)
    return answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = sample_jpeg()
    extra = {"REQUEST_TIMEOUT_S": str(args.timeout)}
    worker = "app.worker:ViTWorker"
    if args.worker == "echo":
        worker, extra["SLEEPY_ITEM_S"] = SLEEPY, str(args.item_sleep)
    load_before = load_average()
    print(f"load average before: {load_before}; cpus: {len(os.sched_getaffinity(0))}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="overload_bench-") as logs:
        args.logs = Path(logs)
        with app_server(args, "overload", args.workers, worker, extra) as server:
            server.wait_ready(READY_TIMEOUT)
            assert server.process is not None
            print(f"server pid {server.process.pid}", flush=True)  # for py-spy --pid
            request = multipart_request(server.port, image)
            phase(server, request, 8, 2.0)  # warm-up: first calls, and a measured drain rate
            phases = {}
            for clients in args.connections:
                print(f"{clients} connections for {args.duration:g} s ...", flush=True)
                phases[clients] = phase(server, request, clients, args.duration).summary(
                    args.timeout)
                time.sleep(args.timeout + 1)  # the queue of one phase is not the next's
    load_after = load_average()
    low, high = phases[min(phases)], phases[max(phases)]
    return {"model": args.model if args.worker == "vit" else f"echo, {args.item_sleep} s/item",
            "workers": args.workers, "request_timeout_s": args.timeout,
            "load_average_before": load_before, "load_average_after": load_after,
            "phases": list(phases.values()),
            "targets": {
                "expired_share": (high["expired_share"], "<= 0.01"),
                "ok_p99_s": (high["ok_p99_s"], f"<= {args.timeout:g}"),
                "ok_per_s_ratio": (high["ok_per_s"] / low["ok_per_s"], ">= 0.5"),
                "refused_p99_ms": (high["refused_p99_ms"], "< 100")}}


def table(result: dict[str, Any]) -> str:
    rows = [
        ("successful req/s", "ok_per_s", "{:.1f}"), ("answers", "answers", "{}"),
        ("200", "ok", "{}"), ("503", "refused_503", "{}"), ("504", "expired_504", "{}"),
        ("504 share of answers", "expired_share", "{:.2%}"),
        ("other status / broken connections", None, ""),
        ("accepted p50", "ok_p50_s", "{:.2f} s"), ("accepted p99", "ok_p99_s", "{:.2f} s"),
        ("503 p50", "refused_p50_ms", "{:.1f} ms"), ("503 p99", "refused_p99_ms", "{:.1f} ms"),
        ("503 max", "refused_max_ms", "{:.1f} ms"),
        ("503 p99, sent after the first second", "refused_p99_after_1s_ms", "{:.1f} ms")]
    phases = result["phases"]
    lines = ["| | " + " | ".join(f"{p['clients']} connections" for p in phases) + " |",
             "|---|" + "---:|" * len(phases)]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{p['other_status']} / {p['broken_connections']}" for p in phases]
        else:
            cells = [fmt.format(p[key]) for p in phases]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    names = ["load generator", "API process", "workers"]
    for name in names:
        lines.append(f"| CPU, {name} (cores) | " + " | ".join(
            f"{p['cpu_cores'].get(name, 0):.2f}" for p in phases) + " |")
    lines += ["", "| target | measured | goal |", "|---|---:|---:|"]
    for name, (value, goal) in result["targets"].items():
        lines.append(f"| {name} | {value:.3g} | {goal} |")
    lines.append(f"\nload average before {result['load_average_before']}, after "
                 f"{result['load_average_after']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--worker", choices=["vit", "echo"], default="vit",
                        help="echo: the echo worker sleeping --item-sleep per image")
    parser.add_argument("--item-sleep", type=float, default=0.04)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="REQUEST_TIMEOUT_S")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--quick", action="store_true", help="5 s phases")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.duration = 5.0
    result = run(args)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


# ---- the stand-in model: no CPU, a fixed time per image -----------------------------------

def _sleepy_worker() -> Any:
    from app.examples.echo_worker import EchoWorker

    class SleepyEchoWorker(EchoWorker):
        """The echo worker sleeping ``SLEEPY_ITEM_S`` per image: a model's time without its
        CPU, so the load generator and the API process do not take a model's cores."""

        def execute_batch(self, items: list[Any]) -> list[Any]:
            time.sleep(float(os.environ.get("SLEEPY_ITEM_S", "0.04")) * len(items))
            return super().execute_batch(items)

    return SleepyEchoWorker


def __getattr__(name: str) -> Any:
    if name == "SleepyEchoWorker":
        return _sleepy_worker()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
