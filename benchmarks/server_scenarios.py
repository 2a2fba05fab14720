"""The two failure scenarios of ``server_bench.py``: overload and clients that leave.

* ``overload_scenario`` (``--only overload``): 512 clients against vit_tiny on 2 CPU workers
  with ``REQUEST_TIMEOUT_S=5``; a 503 is retried after its ``Retry-After``. Reports the
  latency of the accepted requests, of the 503s, and the 504s of requests whose deadline
  passed in the queue.
* ``disconnect_scenario``: vit_tiny on 1 CPU worker, 24 clients each sending 16 images and
  hanging up after 1 s. Reports how long the pool keeps working after the last client left
  (``pool_queue_depth`` and ``pool_in_flight`` in ``/metrics`` back to 0).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from benchmarks.bench_servers import READY_TIMEOUT, app_server
from benchmarks.http_load import multipart_request, read_answer

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
        status, retry = await read_answer(reader)
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
