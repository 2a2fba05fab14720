"""Chaos: worker processes killed at random under load, then quiet; does the server heal?

vit_tiny_patch16_224 (random weights) on 2 CPU workers, started as ``make serve`` starts it,
16 clients each posting one 500x375 JPEG in a closed loop (a 503 is retried after its
``Retry-After``). Phases: ``--baseline`` seconds of
load (the capacity to come back to), ``--chaos`` seconds during which a random worker
process is SIGKILLed every 2-6 s (its pid from the server's ``/v1/model``: only the server's
own workers, only on 127.0.0.1), then ``--quiet`` seconds of the same load without kills.

Reported: kills, failed requests (any answer but 200) per kill, requests without an answer
(a connection broken mid-request, or no answer within 60 s: the goal is none), time from the
last kill until ``/readyz`` counts every worker again, and req/s before the kills and in the
last half of the quiet phase (full capacity: the same, within the machine's noise).

    python benchmarks/chaos_bench.py                    # 10 s + 60 s + 60 s
    python benchmarks/chaos_bench.py --quick            # 5 s + 15 s + 20 s
    python benchmarks/chaos_bench.py --json docs/bench/chaos_bench-DATE.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_servers import READY_TIMEOUT, app_server  # noqa: E402
from benchmarks.http_load import multipart_request, read_answer, sample_jpeg  # noqa: E402
from benchmarks.proc_cpu import load_average  # noqa: E402

ANSWER_TIMEOUT_S = 60.0


async def get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                 .encode())
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1]


async def get_json(port: int, path: str) -> Any:
    return json.loads(await get(port, path))


async def chaos(port: int, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    chaos_at = start + args.baseline
    quiet_at = chaos_at + args.chaos
    end = quiet_at + args.quiet
    request = multipart_request(port, image)
    answers: list[tuple[float, int]] = []  # (when answered, status)
    unanswered = 0
    kills: list[float] = []
    ready_log: list[tuple[float, int, int]] = []
    rng = random.Random(args.seed)

    async def one_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        status, retry = await read_answer(reader)
        answers.append((loop.time() - start, status))
        if status == 503:  # a polite client: back after Retry-After
            await asyncio.sleep(min(retry, max(0.0, end - loop.time())))

    async def client() -> None:
        nonlocal unanswered
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                while loop.time() < end:
                    await asyncio.wait_for(one_call(reader, writer), ANSWER_TIMEOUT_S)
                writer.close()
            except (OSError, IndexError, ValueError, asyncio.IncompleteReadError,
                    TimeoutError):
                unanswered += 1

    async def killer() -> None:
        await asyncio.sleep(chaos_at - loop.time())
        while (wait := rng.uniform(2.0, 6.0)) < quiet_at - loop.time():
            await asyncio.sleep(wait)
            workers = (await get_json(port, "/v1/model"))["workers"]
            pids = [w["pid"] for w in workers if w["pid"] and w["state"] in ("idle", "busy")]
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills.append(loop.time() - start)

    async def watch_ready() -> None:
        while loop.time() < end:
            body = await get_json(port, "/readyz")
            ready_log.append((loop.time() - start, body.get("workers_ready", 0),
                              body.get("workers", 0)))
            await asyncio.sleep(0.25)

    await asyncio.gather(killer(), watch_ready(), *(client() for _ in range(args.clients)))

    metrics = (await get(port, "/metrics")).decode()
    refused = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("http_requests_refused_total{")}
    # From here on, times are seconds since the start, as the answers' are.
    chaos_at, quiet_at, end = args.baseline, args.baseline + args.chaos, (
        args.baseline + args.chaos + args.quiet)
    last_kill = kills[-1] if kills else quiet_at
    back = None  # the first moment after the last kill from which every worker stays ready
    for t, ready, planned in ready_log:
        if t < last_kill:
            continue
        if ready < planned:
            back = None
        elif back is None:
            back = t
    failed = [t for t, status in answers if status != 200]
    crashed = [t for t, status in answers if status == 500]
    statuses = Counter(status for _, status in answers)
    half = quiet_at + args.quiet / 2
    before = sum(1 for t, s in answers if s == 200 and 0.5 <= t <= chaos_at) / (
        args.baseline - 0.5)
    after = sum(1 for t, s in answers if s == 200 and half <= t <= end) / (end - half)
    return {
        "clients": args.clients, "baseline_s": args.baseline, "chaos_s": args.chaos,
        "quiet_s": args.quiet, "kills": len(kills), "answers": len(answers),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": len(failed), "failed_per_kill": len(failed) / len(kills) if kills else 0.0,
        "crashed_500_per_kill": len(crashed) / len(kills) if kills else 0.0,
        "unanswered": unanswered, "refused_by_reason": refused,
        "back_to_full_capacity_s": None if back is None else back - last_kill,
        "ok_per_s_before": before, "ok_per_s_quiet_second_half": after,
        "kill_times_s": [round(t, 1) for t in kills],
        # Answers per second of the run, by status: the dip at each kill, the way back.
        "timeline": [dict(Counter(str(status) for t, status in answers if int(t) == second))
                     for second in range(int(end - start) + 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--baseline", type=float, default=10.0)
    parser.add_argument("--chaos", type=float, default=60.0)
    parser.add_argument("--quiet", type=float, default=60.0)
    parser.add_argument("--backoff-max", type=float, default=20.0,
                        help="RESTART_BACKOFF_MAX_S: the longest a crash-looping slot waits")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.baseline, args.chaos, args.quiet = 5.0, 15.0, 20.0
    image = sample_jpeg()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="chaos_bench-") as logs:
        args.logs = Path(logs)
        with app_server(args, "chaos", args.workers, extra={
                "RESTART_BACKOFF_MAX_S": str(args.backoff_max)}) as server:
            server.wait_ready(READY_TIMEOUT)
            result = asyncio.run(chaos(server.port, image, args))
    result.update(model=args.model, workers=args.workers, restart_backoff_max_s=args.backoff_max,
                  load_average_before=load_before, load_average_after=load_average())
    back = result["back_to_full_capacity_s"]
    print(f"| {args.workers} workers, {args.clients} clients | |\n|---|---:|\n"
          f"| kills (SIGKILL, every 2-6 s for {args.chaos:g} s) | {result['kills']} |\n"
          f"| answers | {result['answers']} ({result['statuses']}) |\n"
          f"| failed requests per kill (any answer but 200) | "
          f"{result['failed_per_kill']:.1f} |\n"
          f"| of which 500 (lost with the killed worker) per kill | "
          f"{result['crashed_500_per_kill']:.1f} |\n"
          f"| requests without an answer | {result['unanswered']} |\n"
          f"| 503s by reason | {result['refused_by_reason']} |\n"
          f"| last kill to every worker ready | "
          f"{'never' if back is None else f'{back:.1f} s'} |\n"
          f"| req/s before the kills | {result['ok_per_s_before']:.1f} |\n"
          f"| req/s, second half of the quiet | {result['ok_per_s_quiet_second_half']:.1f} |\n"
          f"\nload average before {result['load_average_before']}, after "
          f"{result['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
