"""Micro-benchmarks of stateful_pool against stateful-pool 0.3.2 and ProcessPoolExecutor.

Every implementation runs in its own subprocess, in the same run, on the same machine, so the
ratios are fair even where absolute figures drift (2 shared cores here). The original
stateful-pool 0.3.2 has the same import name: it is installed with ``pip install --target
.bench/seed`` and imported from there.

    python benchmarks/pool_bench.py              # full table (about 4 minutes here)
    python benchmarks/pool_bench.py --quick      # tiny counts, to check that it runs
    python benchmarks/pool_bench.py --no-seed    # skip 0.3.2 (no package index reachable)
    python benchmarks/pool_bench.py --json out.json

The tables are drawn by ``pool_tables.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT / ".bench" / "seed"
SEED_VERSION = "0.3.2"

# ---- workers (module level: worker processes import them) ---------------------------------


def _trivial(x):
    return x


def _sleep_10ms(x):
    t0 = time.perf_counter()
    time.sleep(0.01)
    return time.perf_counter() - t0  # the worker's busy time (a 10 ms sleep takes longer)


def _payload_len(b):
    return len(b)


def _echo(conn):
    """The raw pipe's other end: send back every message until the pipe closes."""
    while True:
        try:
            conn.send_bytes(conn.recv_bytes())
        except (EOFError, OSError):
            return


def make_worker_classes(SWorker):  # noqa: N803 (the class comes from the implementation)
    class Trivial(SWorker):
        def spawn(self):
            return os.getpid()

        def execute(self, x):
            return x

    class Sleeper(SWorker):
        def spawn(self):
            return os.getpid()

        def execute(self, x):
            return _sleep_10ms(x)

    class Sized(SWorker):
        def spawn(self):
            return os.getpid()

        def execute(self, b):
            return len(b)

    class GpuLike(SWorker):
        """Costs like a GPU: 10 ms per call plus 1 ms per item."""

        def spawn(self):
            return os.getpid()

        def execute(self, x):
            time.sleep(0.011)
            return x

        def execute_batch(self, batch):
            time.sleep(0.010 + 0.001 * len(batch))
            return list(batch)

    return {"Trivial": Trivial, "Sleeper": Sleeper, "Sized": Sized, "GpuLike": GpuLike}


def _install_worker_classes(module_name: str) -> dict:
    """Define the worker classes at module level of __main__ so spawned children find them."""
    from stateful_pool import SWorker

    classes = make_worker_classes(SWorker)
    main = sys.modules[module_name]
    for name, cls in classes.items():
        cls.__module__ = module_name
        cls.__qualname__ = name
        setattr(main, name, cls)
    return classes


if __name__ == "__mp_main__":  # a spawned worker re-imports this file under that name
    _install_worker_classes("__mp_main__")


# ---- measurements -------------------------------------------------------------------------


def _latency_us(call, n: int) -> float:
    for _ in range(min(200, n)):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _utilisation(run, workers: int = 8) -> float:
    """Share of the wall time the workers spent inside their tasks: ``run`` returns the sum
    of the busy times the workers measured (a 10 ms sleep takes 10.5-11 ms on a loaded
    machine, so counting 10 ms per task would cap this below 0.95 whatever the pool does)."""
    t0 = time.perf_counter()
    busy = run()
    return busy / (workers * (time.perf_counter() - t0))


def _cpu_us(run, n: int) -> float:
    """This process's CPU time (all its threads, not its children) per task while ``run``
    does ``n`` tasks (us)."""
    c0 = time.process_time()
    run()
    return (time.process_time() - c0) / n * 1e6


def bench_raw_pipe(counts: dict) -> dict:
    """The floor of any hop to a worker: a ``multiprocessing.Pipe`` ping-pong of one small
    message with a child process (latency, and this process's CPU per round trip)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_echo, args=(theirs,))
    child.start()
    theirs.close()
    message = b"x" * 32

    def round_trip():
        ours.send_bytes(message)
        ours.recv_bytes()

    try:
        out = {"raw_latency_us": _latency_us(round_trip, counts["latency"])}
        n = counts["cpu"]
        out["raw_cpu_us"] = _cpu_us(lambda: [round_trip() for _ in range(n)], n)
    finally:
        ours.close()
        child.join(10)
    return out


def _rate(n: int, run) -> float:
    t0 = time.perf_counter()
    run()
    return n / (time.perf_counter() - t0)


def bench_pool(counts: dict, include_batching: bool, **pool_kwargs) -> dict:
    """Run every workload on an SPool (ours or 0.3.2, whichever is importable)."""
    import functools

    from stateful_pool import SPool

    SPool = functools.partial(SPool, **pool_kwargs)  # noqa: N806 (backend="ray" for that side)
    classes = _install_worker_classes("__main__")
    out: dict[str, float] = {}

    with SPool(classes["Trivial"]) as pool:
        pool.spawn()
        pool.spawn()
        out["latency_us"] = _latency_us(lambda: pool.execute(1), counts["latency"])
        n = counts["submit"]
        out["submit_per_s"] = _rate(n, lambda: [f.result() for f in
                                                [pool.submit_execute(i) for i in range(n)]])
        n = counts["async"]

        async def gather_all():
            await asyncio.gather(*(pool.async_execute(i) for i in range(n)))

        out["async_per_s"] = _rate(n, lambda: asyncio.run(gather_all()))
        n = counts["cpu"]

        async def one_caller():  # a request handler's pattern: await one task at a time
            for i in range(n):
                await pool.async_execute(i)

        out["async_cpu_us"] = _cpu_us(lambda: asyncio.run(one_caller()), n)

    for n in counts["bounded"]:  # the server pattern: more async callers than queue_size
        with SPool(classes["Trivial"], queue_size=counts["bounded_queue"]) as pool:
            pool.spawn()
            pool.spawn()

            async def gather_bounded(pool=pool, n=n):
                await asyncio.gather(*(pool.async_execute(i) for i in range(n)))

            out[f"bounded{n}_per_s"] = _rate(n, lambda: asyncio.run(gather_bounded()))

    if include_batching:  # ours only: the opt-in prefetch, on the same trivial workload
        with SPool(classes["Trivial"], prefetch=1) as pool:
            pool.spawn()
            pool.spawn()
            n = counts["submit"]
            out["submit_prefetch_per_s"] = _rate(
                n, lambda: [f.result() for f in [pool.submit_execute(i) for i in range(n)]])

    if include_batching:  # ours: the raw pipe, measured in the same process and round
        out.update(bench_raw_pipe(counts))

    with SPool(classes["Sleeper"]) as pool:
        for _ in range(8):
            pool.spawn()
        per_caller = counts["util_per_caller"]

        async def callers():
            async def caller():
                return sum([await pool.async_execute(i) for i in range(per_caller)])
            return sum(await asyncio.gather(*(caller() for _ in range(100))))

        out["utilisation_8x10ms"] = _utilisation(lambda: asyncio.run(callers()))

    with SPool(classes["Sized"]) as pool:
        pool.spawn()
        pool.spawn()
        blob = os.urandom(1 << 20)
        n = counts["mib"]
        out["mib_per_s"] = _rate(n, lambda: [f.result() for f in
                                             [pool.submit_execute(blob) for _ in range(n)]])

    if include_batching:
        out.update(bench_batching(counts))
    return out


def bench_batching(counts: dict) -> dict:
    from stateful_pool import SPool

    classes = _install_worker_classes("__main__")
    out: dict[str, float] = {}
    n = counts["batch_tasks"]
    for size in (1, 8, 32):
        with SPool(classes["GpuLike"], max_batch_size=size, max_batch_wait=0.005) as pool:
            pool.spawn()
            pool.spawn()

            async def callers(pool=pool):
                async def caller(k):
                    for i in range(n // 64):
                        await pool.async_execute(k * 1000 + i)
                await asyncio.gather(*(caller(k) for k in range(64)))

            out[f"batch{size}_per_s"] = _rate(n // 64 * 64, lambda: asyncio.run(callers()))
            if size > 1:
                out[f"batch{size}_mean_size"] = pool.stats().batch_size_mean
    for size, wait in ((1, 0.0), (32, 0.005)):
        with SPool(classes["GpuLike"], max_batch_size=size, max_batch_wait=wait) as pool:
            pool.spawn()
            out[f"lone_ms_batch{size}"] = _latency_us(
                lambda pool=pool: pool.execute(1), counts["lone"]) / 1000
    return out


def bench_ppe(counts: dict) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    out: dict[str, float] = {}
    with ProcessPoolExecutor(2) as ex:
        ex.submit(_trivial, 0).result()
        out["latency_us"] = _latency_us(lambda: ex.submit(_trivial, 1).result(),
                                        counts["latency"])
        n = counts["submit"]
        out["submit_per_s"] = _rate(n, lambda: [f.result() for f in
                                                [ex.submit(_trivial, i) for i in range(n)]])
        n = counts["async"]

        async def gather_all():
            await asyncio.gather(*(asyncio.wrap_future(ex.submit(_trivial, i))
                                   for i in range(n)))

        out["async_per_s"] = _rate(n, lambda: asyncio.run(gather_all()))
    with ProcessPoolExecutor(8) as ex:
        list(ex.map(_trivial, range(16)))
        per_caller = counts["util_per_caller"]

        async def callers():
            async def caller():
                return sum([await asyncio.wrap_future(ex.submit(_sleep_10ms, i))
                            for i in range(per_caller)])
            return sum(await asyncio.gather(*(caller() for _ in range(100))))

        out["utilisation_8x10ms"] = _utilisation(lambda: asyncio.run(callers()))
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(_trivial, range(4)))
        blob = os.urandom(1 << 20)
        n = counts["mib"]
        out["mib_per_s"] = _rate(n, lambda: [f.result() for f in
                                             [ex.submit(_payload_len, blob) for _ in range(n)]])
    return out


COUNTS = {
    "full": {"latency": 2000, "submit": 20_000, "async": 5000, "cpu": 5000, "util_per_caller": 20,
             "mib": 400, "batch_tasks": 2048, "lone": 100, "bounded": (1000, 5000, 20_000),
             "bounded_queue": 1000},
    # Ray's hop costs about 1 ms per call: fewer tasks keep that side to a minute.
    "ray": {"latency": 300, "submit": 2000, "async": 1000, "cpu": 300, "util_per_caller": 5,
            "mib": 100, "batch_tasks": 0, "lone": 0, "bounded": (), "bounded_queue": 0},
    "quick": {"latency": 50, "submit": 500, "async": 200, "cpu": 200, "util_per_caller": 2,
              "mib": 10, "batch_tasks": 128, "lone": 5, "bounded": (200, 1000),
              "bounded_queue": 100},
}


def ensure_seed() -> bool:
    if (SEED_DIR / "stateful_pool").exists():
        return True
    print(f"installing stateful-pool=={SEED_VERSION} into {SEED_DIR} ...", file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SEED_DIR),
         f"stateful-pool=={SEED_VERSION}"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"could not install stateful-pool {SEED_VERSION}: {result.stderr.strip()[-300:]}",
              file=sys.stderr)
        return False
    return True


def run_side(impl: str, mode: str) -> dict:
    path = {"spool": str(ROOT), "seed": str(SEED_DIR), "ppe": str(ROOT), "ray": str(ROOT)}[impl]
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run([sys.executable, __file__, "--side", impl, "--mode", mode],
                            env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    parser.add_argument("--no-seed", action="store_true", help="skip stateful-pool 0.3.2")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--ray", action="store_true",
                        help="add a side with backend='ray' (needs stateful-pool[ray]; starts "
                             "a local Ray instance unless RAY_ADDRESS is set)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; the sides alternate within each, medians are reported")
    parser.add_argument("--render", metavar="JSON",
                        help="print the tables of a run saved with --json, and exit")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = "quick" if args.quick else args.mode
    if args.side:  # one implementation, in its own interpreter
        if args.side == "ppe":
            result = bench_ppe(COUNTS[mode])
        elif args.side == "ray":
            result = bench_pool(COUNTS["quick" if mode == "quick" else "ray"],
                                include_batching=False, backend="ray")
        else:
            result = bench_pool(COUNTS[mode], include_batching=args.side == "spool")
        print(json.dumps(result))
        return

    # loadtest and the tables are not installed: take them from this checkout. Here, not at
    # the top: a side imports stateful_pool from its PYTHONPATH (0.3.2's for the seed), never
    # from ROOT.
    sys.path.append(str(ROOT))
    from benchmarks.pool_tables import render
    from loadtest.rounds import alternate, medians

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        saved_mode = saved.get("mode", "full")
        print(render(saved["median"], saved_mode, len(saved["rounds"]["spool"]),
                     COUNTS[saved_mode], saved.get("cpus"), saved.get("python")))
        return

    sides = ["spool", "ppe"]
    if not args.no_seed and ensure_seed():
        sides.insert(1, "seed")
    if args.ray:
        sides.append("ray")

    def side_run(side: str):
        def run(round_: int) -> dict:
            print(f"round {round_}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
            return run_side(side, mode)
        return run

    # The sides take turns round after round and each figure is the median over rounds, so
    # a burst of load from elsewhere on this 2-core machine cannot favour one side.
    rounds = alternate({side: side_run(side) for side in sides}, args.rounds)
    results = {side: medians(runs) for side, runs in rounds.items()}

    print(render(results, mode, args.rounds, COUNTS[mode]))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"median": results, "rounds": rounds, "mode": mode, "cpus": os.cpu_count(),
             "python": sys.version.split()[0]}, indent=2))


if __name__ == "__main__":
    main()
