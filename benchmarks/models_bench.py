"""Several models in one server (``MODELS_FILE``), on CPU, in one run.

1. Sharing: two example models, ``vit_tiny_patch16_224`` (``app.worker:ViTWorker``, one
   JPEG per request) and the byte-level text classifier (``app.examples.text:TextClassifier``,
   four texts per request), each with one CPU worker of one torch thread (``cpu_threads =
   1``), so each has one core's share. Each is served alone (a models file of that model)
   and then both from one file, loaded at once. Reported: each model's requests/s together
   against alone (goal: >= 0.8x).
2. Reload: a model with two CPU workers under 32 clients of continuous load;
   ``POST /admin/models/{name}/reload`` in the middle (new workers spawn beside the old
   ones, then the old retire). Twice: the ViT, whose new workers' start (importing torch,
   building the model) competes for the cores with the old ones serving, and the echo
   worker, whose start costs little. Reported: failed requests counted by the clients
   (goal: 0), and the latency p99 of the requests answered during the swap (from the reload
   call until the old workers have stopped) against the p99 before it (goal: <= 2x).

Each server runs in its own process, started like ``make serve``; the load comes from this
process (asyncio keep-alive connections sending prebuilt requests). Only 127.0.0.1 is used.

    python benchmarks/models_bench.py                 # about 2 minutes
    python benchmarks/models_bench.py --quick         # seconds, to check that it runs
    python benchmarks/models_bench.py --json docs/bench/models_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_servers import READY_TIMEOUT, bench_server  # noqa: E402
from benchmarks.http_load import (  # noqa: E402
    Phase,
    json_request,
    multipart_request,
    raw_caller,
    read_answer,
    run_load,
    sample_jpeg,
)

VIT = """
[models.vit]
worker_class = "app.worker:ViTWorker"
model_name = "vit_tiny_patch16_224"
weights = "random"
devices = {devices}
cpu_threads = 1
max_batch_size = 8
"""
TEXT = """
[models.text]
worker_class = "app.examples.text:TextClassifier"
weights = "random"
devices = ["cpu"]
cpu_threads = 1
max_batch_size = 16
"""
ECHO = """
[models.echo]
worker_class = "app.examples.echo_worker:EchoWorker"
devices = ["cpu", "cpu"]
"""
KEY = "bench-admin-key"
TEXTS = json.dumps({"texts": ["a fine day for a benchmark", "the queue was empty",
                              "nothing failed", "all of it was served"]}).encode()


@dataclass
class Sharing:
    model: str
    alone_rate: float
    together_rate: float
    alone_p99_ms: float
    together_p99_ms: float

    @property
    def ratio(self) -> float:
        return self.together_rate / self.alone_rate


@dataclass
class Reload:
    model: str
    clients: int
    requests: int
    failed: int
    reload_s: float
    swap_s: float
    before_p99_ms: float
    during_p99_ms: float
    during_requests: int

    @property
    def ratio(self) -> float:
        return self.during_p99_ms / self.before_p99_ms


def models_file(folder: Path, name: str, text: str) -> str:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return str(path)


def requests_for(port: int) -> dict[str, bytes]:
    auth = f"Authorization: Bearer {KEY}\r\n"
    def upload(model: str) -> bytes:
        image = multipart_request(port, sample_jpeg(), path=f"/models/{model}/predict")
        head, _, body = image.partition(b"\r\n\r\n")
        return head.replace(b"\r\nContent-Type", f"\r\n{auth}Content-Type".encode(), 1) + \
            b"\r\n\r\n" + body

    return {"vit": upload("vit"), "echo": upload("echo"),
            "text": json_request(port, "/models/text/predict", TEXTS, auth)}


async def load_models(port: int, models: list[str], clients: int, warmup: float,
                      duration: float) -> dict[str, Phase]:
    requests = requests_for(port)
    phases = await asyncio.gather(*(
        run_load(model, raw_caller(port, requests[model]), clients, warmup, duration)
        for model in models))
    return dict(zip(models, phases, strict=True))


def sharing(args: argparse.Namespace, folder: Path) -> list[Sharing]:
    vit = VIT.format(devices='["cpu"]')
    alone: dict[str, Phase] = {}
    for name, text in (("vit", vit), ("text", TEXT)):
        with server(args, f"{name}-alone", models_file(folder, name, text)) as process:
            alone.update(asyncio.run(load_models(process.port, [name], args.clients,
                                                 args.warmup, args.seconds)))
    with server(args, "both", models_file(folder, "both", vit + TEXT)) as process:
        together = asyncio.run(load_models(process.port, ["vit", "text"], args.clients,
                                           args.warmup, args.seconds))
    for phase in [*alone.values(), *together.values()]:
        if phase.errors:
            raise SystemExit(f"{phase.name}: {phase.errors} failed requests")
    return [Sharing(name, alone[name].rate, together[name].rate, alone[name].p99_ms,
                    together[name].p99_ms) for name in ("vit", "text")]


def server(args: argparse.Namespace, name: str, path: str) -> Any:
    process = bench_server(args, name, "app", {"MODELS_FILE": path, "API_KEY": KEY,
                                               "DEVICE": "cpu", "LOG_LEVEL": "warning"})

    class Running:
        def __enter__(self) -> Any:
            process.start()
            process.wait_ready(READY_TIMEOUT)
            return process

        def __exit__(self, *exc_info: object) -> None:
            process.stop()

    return Running()


def old_workers_gone(url: str, model: str, pids: set[int]) -> bool:
    request = urllib.request.Request(f"{url}/models/{model}",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        current = {w["pid"] for w in json.loads(answer.read())["workers"]}
    return not (pids & current) and _no_such_processes(pids)


def _no_such_processes(pids: set[int]) -> bool:
    import os

    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


async def reload_under_load(args: argparse.Namespace, model: str, port: int, url: str,
                            old_pids: set[int]) -> Reload:
    """32 clients posting; the reload call after ``args.warmup + args.seconds``."""
    request = requests_for(port)[model]
    loop = asyncio.get_running_loop()
    done: list[tuple[float, float, bool]] = []  # (finished at, seconds, ok)
    stop = asyncio.Event()

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop.is_set():
                began = loop.time()
                try:
                    writer.write(request)
                    status, _ = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    done.append((loop.time(), loop.time() - began, False))
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                done.append((loop.time(), loop.time() - began, status == 200))
        finally:
            writer.close()

    clients = [asyncio.ensure_future(client()) for _ in range(args.reload_clients)]
    await asyncio.sleep(args.warmup)
    before_from = loop.time()
    await asyncio.sleep(args.seconds)
    swap_from = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(json_request(port, f"/admin/models/{model}/reload", b"{}",
                              f"Authorization: Bearer {KEY}\r\n"))
    status, _ = await read_answer(reader)
    writer.close()
    reloaded_at = loop.time()
    if status != 200:
        raise SystemExit(f"the reload answered {status}")
    while not await loop.run_in_executor(None, old_workers_gone, url, model, old_pids):
        await asyncio.sleep(0.05)
    swap_to = loop.time()
    await asyncio.sleep(2.0)  # after the swap: the load goes on, every answer still counts
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)

    def p99(window: list[float]) -> float:
        window = sorted(window)
        return window[min(len(window) - 1, int(0.99 * len(window)))] * 1000

    before = [s for t, s, ok in done if before_from <= t < swap_from and ok]
    # Answered during the swap, or sent before its end.
    during = [s for t, s, ok in done if t >= swap_from and t - s <= swap_to and ok]
    counted = [ok for t, _, ok in done if t >= before_from]
    return Reload(model, args.reload_clients, len(counted), counted.count(False),
                  reloaded_at - swap_from, swap_to - swap_from, p99(before), p99(during),
                  len(during))


def reload(args: argparse.Namespace, folder: Path, model: str, text: str) -> Reload:
    path = models_file(folder, f"reload-{model}", text)
    with server(args, f"reload-{model}", path) as process:
        request = urllib.request.Request(f"{process.url}/models/{model}",
                                         headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            old_pids = {w["pid"] for w in json.loads(answer.read())["workers"]}
        return asyncio.run(reload_under_load(args, model, process.port, process.url,
                                             old_pids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    parser.add_argument("--clients", type=int, default=8, help="clients per model (sharing)")
    parser.add_argument("--reload-clients", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    args.warmup, args.seconds = (1.0, 2.0) if args.quick else (3.0, 10.0)
    with tempfile.TemporaryDirectory(prefix="models_bench-") as tmp:
        folder = Path(tmp)
        args.logs = folder
        shared = sharing(args, folder)
        swaps = [reload(args, folder, "vit", VIT.format(devices='["cpu", "cpu"]')),
                 reload(args, folder, "echo", ECHO)]
    print("\nSeveral models in one server (CPU, vit_tiny and the text classifier, one "
          "worker of one thread each)\n")
    print("| model | alone req/s | together req/s | together / alone (goal >= 0.8) | "
          "p99 alone ms | p99 together ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in shared:
        print(f"| {row.model} | {row.alone_rate:.1f} | {row.together_rate:.1f} | "
              f"{row.ratio:.2f}x | {row.alone_p99_ms:.0f} | {row.together_p99_ms:.0f} |")
    print(f"\nA reload of 2 CPU workers under {args.reload_clients} clients\n")
    print("| model | requests | failed (goal 0) | reload call s | swap s | p99 before ms | "
          "p99 during swap ms | during / before (goal <= 2) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for swapped in swaps:
        print(f"| {swapped.model} | {swapped.requests} | {swapped.failed} | "
              f"{swapped.reload_s:.1f} | {swapped.swap_s:.1f} | {swapped.before_p99_ms:.0f} | "
              f"{swapped.during_p99_ms:.0f} | {swapped.ratio:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "sharing": [{**asdict(row), "ratio": row.ratio} for row in shared],
            "reload": [{**asdict(row), "ratio": row.ratio} for row in swaps]}, indent=2)
            + "\n")


if __name__ == "__main__":
    main()
