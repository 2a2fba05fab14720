"""The load of ``server_bench.py``: concurrent callers in a closed loop, counted inside a
measurement window.

A caller is a coroutine factory: ``http_caller`` opens one keep-alive connection to a server
on 127.0.0.1 and sends the same prebuilt multipart ``POST /predict`` again and again;
``pool_caller`` awaits ``SPool.async_execute`` directly (the raw ceiling, no HTTP).
``run_load`` starts N such callers and returns their ``Phase``: completions, errors and
latency percentiles inside the window after a warm-up, and, given the server's pid, the CPU
time that process (all its threads, not its children) spent over the same window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.proc_cpu import cpu_seconds
from loadtest.images import Upload, generated_images, multipart_body


@dataclass
class Phase:
    name: str
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    # CPU seconds of the server process over the window (``run_load``'s ``cpu_pid``).
    server_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us_per_request(self) -> float | None:
        """The server process's CPU per request answered in the window, in microseconds."""
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s / self.requests * 1e6

    def figures(self) -> dict[str, float]:
        figures = {"rate": self.rate, "p99_ms": self.p99_ms}
        if self.cpu_us_per_request is not None:
            figures["cpu_us_per_request"] = self.cpu_us_per_request
        return figures


# ---- the image and the request ------------------------------------------------------------

def sample_jpeg() -> bytes:
    """A 500x375 photo-like JPEG (a gradient plus noise), about ImageNet's size."""
    return generated_images(1, (500, 375))[0].data


def multipart_request(port: int, image: bytes, copies: int = 1, path: str = "/predict"
                      ) -> bytes:
    """A whole raw HTTP/1.1 POST to ``path`` of ``copies`` times ``image``."""
    body, content_type = multipart_body([Upload("bench.jpg", image, "image/jpeg")] * copies)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


# ---- load: N concurrent loops, counted inside a measurement window ------------------------

async def run_load(name: str, make_call: Callable[[], Awaitable[Callable[[], Awaitable[bool]]]],
                   clients: int, warmup: float, duration: float,
                   cpu_pid: int | None = None) -> Phase:
    """Each client loops ``call()``; completions inside [warmup, warmup+duration] count.
    ``cpu_pid``: the server process whose CPU time over that window to report."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    latencies: list[float] = []
    errors = 0
    cpu: list[float] = []
    if cpu_pid is not None:
        for at in (start, end):
            loop.call_at(at, lambda: cpu.append(cpu_seconds(cpu_pid)))

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

    return Phase(name, len(latencies), duration, errors, pick(0.50), pick(0.99),
                 cpu[1] - cpu[0] if len(cpu) == 2 else None)


def http_caller(port: int, image: bytes) -> Callable[[], Awaitable[Callable[[], Awaitable[bool]]]]:
    return raw_caller(port, multipart_request(port, image))


def raw_caller(port: int, request: bytes
               ) -> Callable[[], Awaitable[Callable[[], Awaitable[bool]]]]:
    """A caller that sends the whole raw HTTP/1.1 ``request`` again and again on one
    keep-alive connection; a call is good when answered 200."""

    async def connect() -> Callable[[], Awaitable[bool]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def call() -> bool:
            writer.write(request)
            status, _ = await read_answer(reader)
            return status == 200

        return call

    return connect


def json_request(port: int, path: str, body: bytes, headers: str = "") -> bytes:
    """A whole raw HTTP/1.1 POST of a JSON ``body`` to ``path``; ``headers``: more header
    lines, each ending with CRLF."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def pool_caller(pool: Any, item: Any) -> Callable[[], Awaitable[Callable[[], Awaitable[bool]]]]:
    async def connect() -> Callable[[], Awaitable[bool]]:
        async def call() -> bool:
            await pool.async_execute(item)
            return True

        return call

    return connect


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one HTTP/1.1 answer with a Content-Length; returns its status and its
    Retry-After in seconds (0 without one)."""
    status = int((await reader.readline()).split()[1])
    length, retry = 0, 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
        elif line[:12].lower() == b"retry-after:":
            retry = int(line[12:])
    await reader.readexactly(length)
    return status, retry
