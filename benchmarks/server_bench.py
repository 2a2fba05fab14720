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
shows the medians.

    python benchmarks/server_bench.py                  # every target, about 6 minutes
    python benchmarks/server_bench.py --only echo      # the three echo rows
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
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from stateful_pool import SWorker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import raw_model  # noqa: E402
from loadtest.images import Upload, generated_images, multipart_body  # noqa: E402
from loadtest.processes import log_tail, logged_process  # noqa: E402
from loadtest.rounds import alternate, medians  # noqa: E402
from loadtest.servers import ServerProcess, ServerSpec  # noqa: E402

ECHO = "app.examples.echo_worker:EchoWorker"
READY_TIMEOUT = 120.0


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def figures(self) -> dict[str, float]:
        return {"rate": self.rate, "p99_ms": self.p99_ms}


# ---- the image and the request ------------------------------------------------------------

def sample_jpeg() -> bytes:
    """A 500x375 photo-like JPEG (a gradient plus noise), about ImageNet's size."""
    return generated_images(1, (500, 375))[0].data


def multipart_request(port: int, image: bytes, copies: int = 1) -> bytes:
    """A whole raw HTTP/1.1 POST /predict of ``copies`` times ``image``."""
    body, content_type = multipart_body([Upload("bench.jpg", image, "image/jpeg")] * copies)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


# ---- load: N concurrent loops, counted inside a measurement window ------------------------

async def run_load(name: str, make_call: Callable[[], Awaitable[Callable[[], Awaitable[bool]]]],
                   clients: int, warmup: float, duration: float) -> Phase:
    """Each client loops ``call()``; completions inside [warmup, warmup+duration] count."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        call = await make_call()
        while loop.time() < end:
            t0 = loop.time()
            ok = await call()
            t1 = loop.time()
            if start <= t1 <= end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    latencies.sort()

    def pick(q: float) -> float:
        return (latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
                if latencies else float("nan"))

    return Phase(name, len(latencies), duration, errors, pick(0.50), pick(0.99))


def http_caller(port: int, image: bytes) -> Callable[[], Awaitable[Callable[[], Awaitable[bool]]]]:
    request = multipart_request(port, image)

    async def connect() -> Callable[[], Awaitable[bool]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def call() -> bool:
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            return status == 200

        return call

    return connect


def pool_caller(pool: Any, item: Any) -> Callable[[], Awaitable[Callable[[], Awaitable[bool]]]]:
    async def connect() -> Callable[[], Awaitable[bool]]:
        async def call() -> bool:
            await pool.async_execute(item)
            return True

        return call

    return connect


# ---- servers ------------------------------------------------------------------------------

def bench_server(args: argparse.Namespace, name: str, module: str, env: dict[str, str],
                 cli_args: tuple[str, ...] = (), ready_path: str = "/readyz") -> ServerProcess:
    """A server subprocess on a free 127.0.0.1 port, its log in ``args.logs``; ``with`` it to
    start it and always stop it (with any worker it left)."""
    spec = ServerSpec(name, name, module, args=cli_args, ready_path=ready_path)
    return ServerProcess(spec, env, args.logs / f"{name}.log")


def app_server(args: argparse.Namespace, name: str, workers: int,
               worker_class: str = "app.worker:ViTWorker",
               extra: dict[str, str] | None = None) -> ServerProcess:
    return bench_server(args, name, "app", {
        "MODEL_NAME": args.model, "MODEL_WEIGHTS": "random", "DEVICE": "cpu",
        "NUM_WORKERS": str(workers), "WORKER_CLASS": worker_class,
        # No per-request access log line, on both sides of each comparison.
        "LOG_LEVEL": "warning", **(extra or {})})


def baseline_server(args: argparse.Namespace, name: str, flag: str) -> ServerProcess:
    """One of this file's own baseline apps (``--serve-plain``, ``--serve-seed``)."""
    return bench_server(args, name, "benchmarks.server_bench", {}, (flag,), "/openapi.json")


def plain_app() -> Any:
    """The echo baseline: same upload handling and checks, the echo run in-process."""
    from app.contract import ImageInput
    from app.examples.echo_worker import EchoWorker
    from app.images import inspect_image

    app = FastAPI()
    worker = EchoWorker()

    @app.post("/predict")
    async def predict(files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        predictions = []
        for upload in files:
            data = await upload.read()
            header = inspect_image(data, max_pixels=40_000_000, name=upload.filename or "")
            item = ImageInput(data, header.format, header.width, header.height, 5)
            predictions.append({"filename": upload.filename, **worker.execute(item)})
        return {"predictions": predictions}

    return app


def serve(app: Any) -> None:
    """Serve ``app`` on 127.0.0.1:$PORT (ServerProcess sets it), without an access log."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning",
                access_log=False)


class NullWorker(SWorker[None, dict[str, int]]):
    """The seed's null model: answers the size of what it was sent."""

    def spawn(self) -> None:
        return None

    def execute(self, data: bytes) -> dict[str, int]:
        return {"bytes": len(data)}


def seed_app() -> Any:
    """The seed's server shape on our library: one endpoint, the upload's bytes straight to
    ``pool.async_execute``, the worker's dict back; no checks, limits or metrics."""
    from contextlib import asynccontextmanager

    from stateful_pool import SPool

    pool: SPool[Any, Any] = SPool(NullWorker)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await pool.async_spawn()
        yield
        pool.shutdown(cancel_futures=True, timeout=10)

    app = FastAPI(lifespan=lifespan)

    @app.post("/predict")
    async def predict(files: Annotated[UploadFile, File()]) -> Any:
        return await pool.async_execute(await files.read())

    return app


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


def rounds_of(args: argparse.Namespace, callers: dict[str, Any]) -> list[list[Phase]]:
    """A load phase of each caller in turn, round after round (loadtest.rounds); one list of
    phases per caller."""
    def phase(name: str, caller: Any) -> Callable[[int], Phase]:
        return lambda round_: asyncio.run(run_load(
            f"{name}, round {round_}", caller, args.clients, args.warmup, args.duration))

    phases = alternate({name: phase(name, caller) for name, caller in callers.items()},
                       args.rounds, after_round=lambda last: report_round(*last.values()))
    return list(phases.values())


def compare_echo(args: argparse.Namespace, image: bytes) -> list[list[Phase]]:
    """Plain in-process endpoint, the seed shape on our library and /predict with the echo
    worker, phases alternating."""
    with baseline_server(args, "plain", "--serve-plain") as plain, \
            baseline_server(args, "seed-shape", "--serve-seed") as seed, \
            app_server(args, "echo", args.echo_workers, ECHO) as server:
        for each in (plain, seed, server):
            each.wait_ready(READY_TIMEOUT)
        return rounds_of(args, {
            "plain FastAPI": http_caller(plain.port, image),
            "seed shape (SPool)": http_caller(seed.port, image),
            "/predict echo": http_caller(server.port, image)})


# ---- overload: bounded latency for the accepted, a fast 503 for the others ----------------

@dataclass
class Overload:
    timeout_s: float
    ok: list[float]
    rejected: list[float]
    expired: list[float]
    other: int
    retry_after: list[int]

    def summary(self) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float:
            values = sorted(values)
            return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

        return {"request_timeout_s": self.timeout_s, "ok": len(self.ok),
                "ok_p50_s": q(self.ok, 0.5), "ok_p99_s": q(self.ok, 0.99),
                "rejected_503": len(self.rejected), "rejected_p99_ms": q(self.rejected, 0.99) * 1e3,
                "rejected_max_ms": max(self.rejected, default=float("nan")) * 1e3,
                "expired_504": len(self.expired), "other": self.other,
                "retry_after_s": sorted(set(self.retry_after))}


async def overload_load(port: int, image: bytes, clients: int, duration: float,
                        timeout_s: float) -> Overload:
    """``clients`` keep-alive connections in a closed loop for ``duration`` s; a 503 is
    retried after its Retry-After, as a polite client would."""
    request = multipart_request(port, image)
    result = Overload(timeout_s, [], [], [], 0, [])
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def one_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = loop.time()
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        length, retry = 0, 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif line[:12].lower() == b"retry-after:":
                retry = int(line[12:])
        await reader.readexactly(length)
        seconds = loop.time() - t0
        if status == 200:
            result.ok.append(seconds)
        elif status == 503:
            result.rejected.append(seconds)
            result.retry_after.append(retry)
            await asyncio.sleep(min(retry, max(0.0, end - loop.time())))
        elif status == 504:
            result.expired.append(seconds)
        else:
            result.other += 1

    async def client() -> None:
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                while loop.time() < end:
                    await one_call(reader, writer)
                writer.close()
            except (OSError, IndexError, asyncio.IncompleteReadError):
                result.other += 1  # the connection failed or was closed: reconnect

    await asyncio.gather(*(client() for _ in range(clients)))
    return result


def overload_scenario(args: argparse.Namespace, image: bytes, clients: int = 512,
                      duration: float = 20.0, timeout_s: float = 5.0) -> Overload:
    with app_server(args, "overload", args.workers,
                    extra={"REQUEST_TIMEOUT_S": str(timeout_s)}) as server:
        server.wait_ready(READY_TIMEOUT)
        return asyncio.run(overload_load(server.port, image, clients, duration, timeout_s))


# ---- clients that leave: how long the pool works for nobody -------------------------------

def pool_gauges(port: int) -> dict[str, float]:
    """``pool_in_flight`` and ``pool_queue_depth`` from ``/metrics``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {name: float(value) for name, value in (
            line.split() for line in response.read().decode().splitlines()
            if line.startswith(("pool_in_flight ", "pool_queue_depth ")))}


async def leave_after(port: int, request: bytes, seconds: float) -> None:
    """Send ``request``, wait ``seconds`` (no answer expected by then), hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        pass
    writer.close()


def disconnect_scenario(args: argparse.Namespace, image: bytes, clients: int = 24,
                        images: int = 16, patience: float = 1.0) -> tuple[float, float]:
    """Seconds from the last client hanging up until the queue is empty, and until the pool
    holds no task (the batch running when they left runs to its end)."""
    with app_server(args, "disconnect", 1) as server:
        server.wait_ready(READY_TIMEOUT)
        request = multipart_request(server.port, image, copies=images)

        async def all_leave() -> None:
            await asyncio.gather(*(leave_after(server.port, request, patience)
                                   for _ in range(clients)))

        asyncio.run(all_leave())
        left = time.monotonic()
        queue_empty = None
        while True:
            gauges = pool_gauges(server.port)
            now = time.monotonic() - left
            if queue_empty is None and gauges["pool_queue_depth"] == 0:
                queue_empty = now
            if gauges["pool_in_flight"] == 0:
                return queue_empty if queue_empty is not None else now, now
            if now > 120:
                raise TimeoutError("the pool was still busy 120 s after the clients left")
            time.sleep(0.02)


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
        print(f"  {p.name:28s} {p.rate:8.1f}/s  p50 {p.p50_ms:7.1f} ms  p99 {p.p99_ms:7.1f} ms"
              f"  errors {p.errors}", flush=True)


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
                "phases": [{**asdict(p), "rate": p.rate} for p in self.base + self.cand]}


def run(args: argparse.Namespace) -> None:
    """Every comparison asked for, then the table."""
    image = sample_jpeg()
    print(f"image: 500x375 JPEG, {len(image)} bytes; {args.clients} clients, "
          f"{args.duration:g} s per phase after {args.warmup:g} s warm-up, {args.rounds} "
          f"round(s); cpus: {len(os.sched_getaffinity(0))}", flush=True)
    rows: list[Row] = []
    if args.only in (None, "vit"):
        print(f"ViT: {args.model}, {args.workers} CPU worker(s)", flush=True)
        raw, served = compare_vit(args, image)
        rows.append(Row(f"{args.model}, {args.workers} CPU workers, {args.clients} clients",
                        "raw pool (no HTTP) img/s", raw, served, 0.9))
    if args.only in (None, "echo"):
        print(f"echo: {args.echo_workers} worker(s)", flush=True)
        plain, seed, served = compare_echo(args, image)
        target = f"echo worker, {args.clients} clients"
        rows.append(Row(target, "plain FastAPI req/s", plain, served, 0.5))
        rows.append(Row(target, "seed shape on SPool req/s", seed, served, 0.9, 2.0))
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
            {"rows": [row.as_json() for row in rows], "overload": overload,
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
        args.duration, args.warmup, args.rounds, args.clients = 2.0, 0.5, 1, 8
    with tempfile.TemporaryDirectory(prefix="server_bench-") as logs:
        args.logs = Path(logs)  # the servers' logs; an error about a server shows its tail
        run(args)


if __name__ == "__main__":
    main()
