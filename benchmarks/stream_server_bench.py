"""Streamed answers through the server: a tiny causal LM on one CPU worker, over a socket.

``python -m app`` serves ``app.examples.causal_lm:CausalLM`` on a tiny random GPT-2 written
to disk (``make_tiny``), one worker; the client is a raw asyncio socket reading server-sent
events, so it costs little of the shared cores. Every figure comes with a baseline measured
in the same run:

1. time to the first chunk through the server (request sent -> first ``data:`` event read)
   against the model's own first chunk in this process (``stream_open`` + the first
   ``stream_step`` of the same worker class, same prompt, one torch thread on both sides, in
   a process of its own). Target: <= +2 ms.
2. 8 streams arriving 50 ms apart: total tokens/s against one stream alone (target >= 3x),
   and the last stream's first token latency in step times of the running batch (target
   <= 2: it joined the running batch at the next step).
3. a client that disconnects mid-stream: the worker's steps for that stream after the
   disconnect, and the time until its ``stream_close`` (target <= 1 step time). The served
   class is ``CountingLM``, the example with a record of when each step ran.

    python benchmarks/stream_server_bench.py                 # the table of docs/BENCHMARKS.md
    python benchmarks/stream_server_bench.py --quick         # fewer rounds, to check it runs
    python benchmarks/stream_server_bench.py --json out.json # also save the figures
    python benchmarks/stream_server_bench.py --render out.json  # print a saved run's table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.examples.causal_lm import CausalLM, Sequence  # noqa: E402

PROMPT = "the quick brown fox jumps over"
STAGGER_S = 0.05
STREAMS = 8


# Torch threads of the model, in the server's worker and in the baseline alike. One: the tiny
# model gains nothing from a second, and on two shared cores a step's threads wait at their
# barrier for a core that the API process (or another program) holds; the first runs here
# had a lone stream step every 30-50 ms with two threads, 2-5 ms with one.
THREADS = 1


class CountingLM(CausalLM):
    """The example, recording when each of a stream's steps ran (``time.monotonic``, one
    clock for every process of the machine); at ``stream_close`` it appends them to
    ``$STEP_LOG``, one JSON line per stream."""

    def spawn(self, config: Any) -> dict[str, Any]:
        import dataclasses

        return super().spawn(dataclasses.replace(config, num_threads=THREADS))

    def stream_step(self, states: list[Sequence]) -> list[Any]:
        now = time.monotonic()
        for state in states:
            state.__dict__.setdefault("step_times", []).append(now)
        return super().stream_step(states)

    def stream_close(self, state: Sequence) -> None:
        super().stream_close(state)
        with open(os.environ["STEP_LOG"], "a") as log:
            log.write(json.dumps({"closed": time.monotonic(),
                                  "steps": state.__dict__.get("step_times", [])}) + "\n")


# ---- the client: one raw HTTP/1.1 connection per stream ---------------------------------

class Events:
    """What one streamed request saw: when it was sent, when each event came, its tokens."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.arrivals: list[float] = []
        self.tokens = 0
        self.left_at: float | None = None


async def stream(port: int, body: dict[str, Any], leave_after: int | None = None) -> Events:
    """POST /predict asking for events; read them as they come (``leave_after``: close the
    connection after that many)."""
    payload = json.dumps({**body, "stream": True}).encode()
    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
               f"Connection: close\r\n\r\n").encode() + payload
    seen = Events()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seen.sent = time.monotonic()
    writer.write(request)
    buffer, position = b"", 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.monotonic()
            buffer += data
            # Chunked framing lines are hex digits: they never hold "data: ".
            while (start := buffer.find(b"data: ", position)) >= 0:
                end = buffer.find(b"\n\n", start)
                if end < 0:
                    break
                seen.arrivals.append(now)
                seen.tokens += json.loads(buffer[start + 6:end])["tokens"]
                position = end + 2
            if leave_after is not None and len(seen.arrivals) >= leave_after:
                seen.left_at = time.monotonic()
                break
    finally:
        writer.close()
    if b" 200 " not in buffer.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"the server refused the stream: {buffer[:300]!r}")
    return seen


# ---- the measurements --------------------------------------------------------------------

class InProcess:
    """The model's own first chunk: ``stream_open`` + the first ``stream_step``, called
    directly on the same worker class, weights and thread count. It runs in a process of its
    own (``--baseline``): torch's threads in the client's process would slow the server's
    worker down."""

    def __init__(self, model_dir: str) -> None:
        from app.contract import WorkerConfig
        from app.examples.causal_lm import GenerateRequest, LMSettings

        self.worker = CausalLM()
        self.worker.spawn(WorkerConfig(0, model_dir, "pretrained", "cpu", "fp32", THREADS,
                                       40_000_000, options=LMSettings()))
        self.item = CausalLM.to_stream(GenerateRequest(prompt=PROMPT, max_tokens=1))

    def first_chunk(self) -> float:
        started = time.perf_counter()
        state = self.worker.stream_open(self.item)
        self.worker.stream_step([state])
        elapsed = time.perf_counter() - started
        self.worker.stream_close(state)
        return elapsed


class Baseline:
    """``InProcess`` in a subprocess: each ``first_chunk()`` asks it for one measurement."""

    def __init__(self, model_dir: str) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, __file__, "--baseline", model_dir], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)

    def first_chunk(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def serve_baseline(model_dir: str) -> None:
    """``--baseline``: one in-process first chunk per line read from stdin."""
    local = InProcess(model_dir)
    for _ in sys.stdin:
        print(local.first_chunk(), flush=True)


async def first_chunk(port: int) -> float:
    seen = await stream(port, {"prompt": PROMPT, "max_tokens": 1})
    return seen.arrivals[0] - seen.sent


def staggered(port: int, streams: int, tokens: int, step_log: Path
              ) -> tuple[float, list[Events], list[list[float]]]:
    """Total tokens/s of ``streams`` streams arriving ``STAGGER_S`` apart, what each client
    saw, and when the worker stepped each stream."""
    async def one(i: int) -> Events:
        await asyncio.sleep(i * STAGGER_S)
        return await stream(port, {"prompt": PROMPT, "max_tokens": tokens})

    async def all_of_them() -> list[Events]:
        return list(await asyncio.gather(*(one(i) for i in range(streams))))

    step_log.write_text("")
    started = time.monotonic()
    runs = asyncio.run(all_of_them())
    rate = sum(r.tokens for r in runs) / (time.monotonic() - started)
    return rate, runs, worker_steps(step_log, streams)


def worker_steps(step_log: Path, streams: int) -> list[list[float]]:
    """When each step of the last ``streams`` streams ran, as the worker recorded them."""
    deadline = time.monotonic() + 10
    while len(lines := step_log.read_text().splitlines()) < streams:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(lines)} of {streams} streams were recorded")
        time.sleep(0.01)
    return [json.loads(line)["steps"] for line in lines[-streams:]]


def step_time(steps: list[list[float]], since: float = 0.0) -> float:
    """The median time between two steps of the worker, from ``since``."""
    times = sorted({t for stream in steps for t in stream if t >= since})
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


async def disconnect(port: int, step_log: Path) -> tuple[int, float, float]:
    """(steps after the client left, seconds to stream_close, the stream's step time)."""
    step_log.write_text("")
    seen = await stream(port, {"prompt": PROMPT, "max_tokens": 400}, leave_after=40)
    assert seen.left_at is not None
    deadline = time.monotonic() + 10
    while not step_log.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    record = json.loads(step_log.read_text().splitlines()[-1])
    steps = record["steps"]
    step = statistics.median(b - a for a, b in zip(steps, steps[1:], strict=False))
    after = sum(t > seen.left_at for t in steps)
    return after, record["closed"] - seen.left_at, step


def measure(quick: bool) -> dict[str, Any]:
    import subprocess

    from loadtest.servers import ServerProcess, ServerSpec

    rounds = 3 if quick else 9
    tokens = 60 if quick else 200
    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "tiny-lm")
        subprocess.run([sys.executable, "-m", "app.examples.causal_lm", "make-tiny", model_dir],
                       cwd=ROOT, check=True, capture_output=True)
        step_log = Path(tmp) / "steps.jsonl"
        spec = ServerSpec("lm", "the tiny LM", "app")
        env = {"WORKER_CLASS": "benchmarks.stream_server_bench:CountingLM",
               "MODEL_NAME": model_dir, "NUM_WORKERS": "1", "DEVICE": "cpu",
               "MAX_BATCH_SIZE": "8", "LOG_LEVEL": "warning", "STEP_LOG": str(step_log),
               "HF_HUB_OFFLINE": "1"}
        with ServerProcess(spec, env, Path(tmp) / "server.log") as server:
            server.wait_ready(180)
            port = server.port
            local = Baseline(model_dir)
            for _ in range(3):  # warm up: first calls, lazy imports
                asyncio.run(first_chunk(port))
                local.first_chunk()
            # Alternated, so that a busy moment of the machine weighs on both sides; apart,
            # because torch's threads spin a while after each call, taking a core.
            pairs = []
            for _ in range(rounds * 3):
                direct_s = local.first_chunk()
                time.sleep(0.2)
                pairs.append((direct_s, asyncio.run(first_chunk(port))))
                time.sleep(0.2)
            local.close()
            direct = statistics.median(p[0] for p in pairs)
            served = statistics.median(p[1] for p in pairs)
            rows.append(("time to first chunk (ms)", f"{served * 1e3:.2f}",
                         f"{direct * 1e3:.2f} in-process stream_open + first stream_step",
                         f"+{(served - direct) * 1e3:.2f} ms", "<= +2 ms"))

            alone_runs = [staggered(port, 1, tokens, step_log) for _ in range(rounds)]
            alone = statistics.median(r[0] for r in alone_runs)
            lone_step = statistics.median(step_time(r[2]) for r in alone_runs)
            runs = [staggered(port, STREAMS, tokens, step_log) for _ in range(rounds)]
            total = statistics.median(r[0] for r in runs)
            rows.append((f"{STREAMS} streams {STAGGER_S * 1e3:.0f} ms apart, {tokens} tokens "
                         "each: tokens/s", f"{total:,.0f}", f"{alone:,.0f} one stream alone",
                         f"{total / alone:.2f}x", ">= 3x"))
            lasts, batch_steps = [], []
            for _, events, steps in runs:
                last = events[-1]
                # Step times of the batch the last stream found running when it arrived.
                batch_step = step_time(steps, last.sent)
                lasts.append((last.arrivals[0] - last.sent) / batch_step)
                batch_steps.append(batch_step)
            batch_step = statistics.median(batch_steps)
            rows.append(("last stream's first token (step times of the running batch)",
                         f"{statistics.median(lasts):.2f}",
                         f"{batch_step * 1e3:.1f} ms batch step, {lone_step * 1e3:.1f} ms "
                         "alone", "-", "<= 2"))

            results = [asyncio.run(disconnect(port, step_log)) for _ in range(rounds)]
            after = statistics.median(r[0] for r in results)
            to_close = statistics.median(r[1] / r[2] for r in results)
            step = statistics.median(r[2] for r in results)
            rows.append(("client leaves mid-stream: worker steps after it left",
                         f"{after:g}", f"{step * 1e3:.1f} ms step", "-", "<= 1"))
            rows.append(("client leaves mid-stream: time to stream_close (step times)",
                         f"{to_close:.2f}", f"{step * 1e3:.1f} ms step", "-", "<= 1"))
    title = (f"Streamed answers through the server: tiny GPT-2, 1 CPU worker, {THREADS} torch "
             "thread "
             f"({os.cpu_count()} CPUs, Python {platform.python_version()}"
             f"{', quick run' if quick else ''}, median of {rounds} rounds)")
    return {"title": title, "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [str(result["title"]), "",
             "| measure | server | baseline (same run) | ratio | target |",
             "|---|---:|---:|---:|---|"]
    for row in result["rows"]:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--render", metavar="JSON", help="print the table of a saved run, exit")
    parser.add_argument("--baseline", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        serve_baseline(args.baseline)
        return
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
