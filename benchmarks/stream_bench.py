"""Streams through stateful_pool: chunk throughput, time to the first chunk, continuous
batching. Every figure comes with a baseline measured in the same run.

    python benchmarks/stream_bench.py            # the table of docs/BENCHMARKS.md
    python benchmarks/stream_bench.py --quick    # tiny counts, to check that it runs
    python benchmarks/stream_bench.py --json out.json   # also save the figures
    python benchmarks/stream_bench.py --render out.json # print a saved run's table

Targets: >= 20,000 chunks/s from one worker to one reader; the first chunk within 2 ms of
the generator's own first step; 8 streams arriving 50 ms apart on one ``stream_step`` worker:
>= 3x the chunks/s of one stream alone, the last stream's first chunk within 2 step times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# This checkout's library, also when the script is run from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stateful_pool import END_OF_STREAM, SPool, SWorker  # noqa: E402


def tokens(n: int, first_s: float = 0.0, step_s: float = 0.0) -> object:
    """The generator under test: a first step of ``first_s``, then one of ``step_s`` each."""
    if first_s:
        time.sleep(first_s)
    for i in range(n):
        if step_s and i:
            time.sleep(step_s)
        yield i


class Generating(SWorker):
    def execute(self, n, first_s=0.0, step_s=0.0):
        return tokens(n, first_s, step_s)


class Decoder(SWorker):
    """A simulated model: one forward step (``step_s``) advances every active stream."""

    def spawn(self, step_s):
        self.step_s = step_s

    def stream_open(self, n):
        return [0, n]

    def stream_step(self, states):
        time.sleep(self.step_s)
        out = []
        for state in states:
            if state[0] >= state[1]:
                out.append(END_OF_STREAM)
            else:
                out.append(state[0])
                state[0] += 1
        return out


def throughput(pool: SPool, n: int) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in pool.stream(n))
    assert count == n
    return n / (time.perf_counter() - started)


def in_process_throughput(n: int) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in tokens(n))
    assert count == n
    return n / (time.perf_counter() - started)


def first_chunk_s(source: object) -> float:
    started = time.perf_counter()
    it = iter(source)  # type: ignore[call-overload]
    next(it)
    elapsed = time.perf_counter() - started
    for _ in it:
        pass
    return elapsed


async def staggered(pool: SPool, streams: int, gap_s: float, n: int
                    ) -> tuple[float, list[float]]:
    """Streams arriving ``gap_s`` apart: total chunks/s, and each one's first-chunk latency."""
    firsts: list[float] = [0.0] * streams

    async def one(i: int) -> int:
        await asyncio.sleep(i * gap_s)
        arrived = time.perf_counter()
        count = 0
        async for _ in pool.async_stream(n):
            if count == 0:
                firsts[i] = time.perf_counter() - arrived
            count += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - started), firsts


def measure(quick: bool) -> dict[str, object]:
    n_fast = 20_000 if quick else 200_000
    rounds = 3 if quick else 7
    step_s, tokens_per_stream = 0.02, (20 if quick else 50)

    rows: list[tuple[str, str, str, str, str]] = []
    with SPool(Generating, execution_timeout=300) as pool:
        pool.spawn()
        throughput(pool, 2000)  # warm up
        pooled = statistics.median(throughput(pool, n_fast) for _ in range(rounds))
        local = statistics.median(in_process_throughput(n_fast) for _ in range(rounds))
        rows.append(("chunks/s, one worker to one reader (grouped)", f"{pooled:,.0f}",
                     f"{local:,.0f} in-process", f"{pooled / local:.3f}x", ">= 20,000/s"))
    with SPool(Generating, execution_timeout=300, stream_buffer=1) as pool:
        pool.spawn()
        ungrouped = statistics.median(throughput(pool, n_fast // 10) for _ in range(rounds))
        rows.append(("chunks/s, stream_buffer=1 (one chunk per message)", f"{ungrouped:,.0f}",
                     f"{pooled:,.0f} grouped", f"{ungrouped / pooled:.3f}x", "-"))
    with SPool(Generating, execution_timeout=300) as pool:
        pool.spawn()
        first_s = 0.005
        via_pool = statistics.median(first_chunk_s(pool.stream(20, first_s))
                                     for _ in range(rounds * 3))
        direct = statistics.median(first_chunk_s(tokens(20, first_s))
                                   for _ in range(rounds * 3))
        rows.append(("time to first chunk, 5 ms first step (ms)", f"{via_pool * 1e3:.2f}",
                     f"{direct * 1e3:.2f} in-process", f"+{(via_pool - direct) * 1e3:.2f} ms",
                     "<= +2 ms"))
    with SPool(Decoder, max_batch_size=8, execution_timeout=300) as pool:
        pool.spawn(step_s)
        alone, _ = asyncio.run(staggered(pool, 1, 0.0, tokens_per_stream))
        # The last stream arrives anywhere within a running step (1 to 2 step times to its
        # first chunk by construction): a median over rounds, not one sample.
        runs = [asyncio.run(staggered(pool, 8, 0.05, tokens_per_stream))
                for _ in range(rounds)]
        total = statistics.median(r[0] for r in runs)
        last_first = statistics.median(r[1][-1] for r in runs)
        rows.append((f"8 streams 50 ms apart, {step_s * 1e3:.0f} ms step, "
                     f"{tokens_per_stream} chunks each: chunks/s", f"{total:,.0f}",
                     f"{alone:,.0f} one stream", f"{total / alone:.2f}x", ">= 3x"))
        rows.append(("last stream's first chunk (step times)", f"{last_first / step_s:.2f}",
                     f"{step_s * 1e3:.0f} ms step", "-", "<= 2"))
    title = (f"Streams through stateful_pool ({os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}{', quick run' if quick else ''}, "
             f"median of {rounds} rounds)")
    return {"title": title, "rows": rows}


def render(result: dict[str, object]) -> str:
    lines = [str(result["title"]), "",
             "| measure | stateful_pool | baseline (same run) | ratio | target |",
             "|---|---:|---:|---:|---|"]
    for row in result["rows"]:  # type: ignore[attr-defined]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--render", metavar="JSON", help="print the table of a saved run, exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    result = measure(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + render(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
