"""The Markdown tables of ``pool_bench.py``, from the figures of one run.

The tables: each workload on stateful_pool, stateful-pool 0.3.2 and ProcessPoolExecutor with
the ratio to 0.3.2 and its target; one task's hop against a raw pipe round trip measured in
the same process; asyncio callers over a bounded queue; the Ray hop (with ``--ray``);
dynamic batching, and the cost of batching to a lone task. ``render`` draws them
from a run's medians or from a JSON file saved with ``--json`` (the docs embed
``python benchmarks/pool_bench.py --render FILE``).
"""

from __future__ import annotations

import os
import sys

ROWS = [
    ("latency_us", "trivial execute latency (us, median; lower is better)", "<= 1.0x seed", False),
    ("submit_per_s", "20k trivial submit_execute, 2 workers (tasks/s)", ">= 1.5x seed", True),
    ("async_per_s", "5k async_execute, 2 workers (tasks/s)", ">= 2x seed", True),
    ("utilisation_8x10ms", "8 workers x 10 ms tasks, 100 async callers (busy share)",
     ">= 0.95", True),
    ("mib_per_s", "1 MiB argument, 2 workers (tasks/s)", ">= 1.0x seed", True),
]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def render(results: dict, mode: str, rounds: int, counts: dict, cpus: int | None = None,
           python: str | None = None) -> str:
    """The Markdown tables of one run, from its figures (also used to render the docs from a
    committed JSON file: ``--render FILE``); ``counts`` are the task counts of ``mode``."""
    lines: list[str] = []

    def out(text: str = "") -> None:
        lines.append(text)

    cpus = cpus or os.cpu_count()
    python = python or sys.version.split()[0]
    spool, seed, ppe = results["spool"], results.get("seed", {}), results["ppe"]
    out(f"\nstateful_pool vs stateful-pool 0.3.2 vs ProcessPoolExecutor "
          f"({cpus} CPUs, Python {python}, {mode} run, "
          f"median of {rounds} interleaved rounds)\n")
    out("| workload | stateful_pool | 0.3.2 | ProcessPoolExecutor | vs 0.3.2 | target |")
    out("|---|---:|---:|---:|---:|---|")
    for key, label, target, higher_better in ROWS:
        ours, theirs = spool.get(key), seed.get(key)
        if theirs:
            ratio_s = f"{ours / theirs:.2f}x" + ("" if higher_better else " the time")
        else:
            ratio_s = "-"
        out(f"| {label} | {fmt(ours)} | {fmt(theirs)} | {fmt(ppe.get(key))} | {ratio_s} "
              f"| {target} |")

    if "raw_latency_us" in spool:
        out("\nThe hop against its floor: a trivial task against a raw multiprocessing.Pipe "
            "round trip of one small message with a child process, measured in the same "
            "process and round (lower is better)\n")
        out("| measure | stateful_pool | 0.3.2 | raw pipe | vs raw pipe | target |")
        out("|---|---:|---:|---:|---:|---|")
        raw_lat, raw_cpu = spool["raw_latency_us"], spool["raw_cpu_us"]
        out(f"| trivial execute latency (us, median) | {fmt(spool['latency_us'])} "
            f"| {fmt(seed.get('latency_us'))} | {fmt(raw_lat)} "
            f"| {spool['latency_us'] / raw_lat:.2f}x | <= 2x raw pipe |")
        if "async_cpu_us" in spool and raw_cpu > 0:
            out(f"| caller CPU per async_execute, one awaiting caller (us) "
                f"| {fmt(spool['async_cpu_us'])} | {fmt(seed.get('async_cpu_us'))} "
                f"| {fmt(raw_cpu)} | {spool['async_cpu_us'] / raw_cpu:.2f}x | - |")

    if seed.get("submit_per_s") and "submit_prefetch_per_s" in spool:
        out(f"\nWith prefetch=1 (opt-in), the 20k trivial submit_execute run gives "
              f"{fmt(spool['submit_prefetch_per_s'])} tasks/s: "
              f"{spool['submit_prefetch_per_s'] / seed['submit_per_s']:.2f}x 0.3.2.")

    if all(f"bounded{n}_per_s" in spool for n in counts["bounded"]) and counts["bounded"]:
        out(f"\nasyncio callers over queue_size={counts['bounded_queue']}, 2 trivial workers "
              "(asyncio.gather of async_execute; the seed's server pattern)\n")
        out("| callers | stateful_pool (tasks/s) | us/task | 0.3.2 (tasks/s) | vs 0.3.2 |")
        out("|---:|---:|---:|---:|---:|")
        for n in counts["bounded"]:
            ours, theirs = spool[f"bounded{n}_per_s"], seed.get(f"bounded{n}_per_s")
            ratio_s = f"{ours / theirs:.2f}x" if theirs else "-"
            out(f"| {n:,} | {fmt(ours)} | {1e6 / ours:.0f} | {fmt(theirs)} | {ratio_s} |")

    if "ray" in results:
        ray_side = results["ray"]
        out("\nThe Ray hop: the same workloads with backend='ray' (local Ray instance; fewer "
              "tasks)\n")
        out("| workload | process backend | ray backend | ray / process |")
        out("|---|---:|---:|---:|")
        for key, label, _, _ in ROWS:
            out(f"| {label} | {fmt(spool[key])} | {fmt(ray_side[key])} "
                  f"| {ray_side[key] / spool[key]:.2f}x |")

    base = spool["batch1_per_s"]
    out("\nDynamic batching: execute_batch costs 10 ms + 1 ms/item, 2 workers, "
          "64 async callers, max_batch_wait=5 ms\n")
    out("| max_batch_size | tasks/s | mean batch | vs batching off |")
    out("|---:|---:|---:|---:|")
    for size in (1, 8, 32):
        rate = spool[f"batch{size}_per_s"]
        mean = spool.get(f"batch{size}_mean_size", 1.0)
        out(f"| {size} | {fmt(rate)} | {mean:.1f} | {rate / base:.2f}x |")
    lone1, lone32 = spool["lone_ms_batch1"], spool["lone_ms_batch32"]
    out(f"\nLone task on an idle pool: {lone1:.2f} ms unbatched, {lone32:.2f} ms with "
          f"max_batch_size=32, max_batch_wait=5 ms (+{lone32 - lone1:.2f} ms; target <= +6 ms)")
    return "\n".join(lines)
