"""The seed's load: a fixed number of requests from blocking clients, one process each.

    python -m loadtest.seed.client --url http://127.0.0.1:8000/predict \\
        --images-per-request 8 --requests 64 --clients 16 --output run.json

``--clients`` processes (a ``multiprocessing`` pool) each post one request with ``requests``
(a new connection per request, as ``requests.post`` does), wait for the answer, then take
the next, until ``--requests`` requests are answered. The clock runs from the first request
to the last answer; the client processes are started before it. Every answer is checked
(``loadtest.answers``): it counts only with status 200 and one prediction per image.
``requests`` missing (the GPU machines here lack it), ``urllib`` sends the same multipart
body instead, and the JSON says so.

The JSON written: ``url``, ``images_per_request``, ``requests``, ``clients``,
``client_library``, ``started_at`` / ``stopped_at`` (unix time), ``wall_s``,
``latencies_ms`` (one per request, as its client saw it), ``failures``, ``errors``
(``{problem: occurrences}``). Only loopback URLs are accepted: this is a load generator.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..answers import answer_problem
from ..images import IMAGE_KINDS, Upload, load_images, multipart_body, parse_size

try:
    import requests
except ImportError:  # pragma: no cover - the GPU machines' Python has no requests
    requests = None

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_target: dict[str, Any] = {}


def client_library() -> str:
    return f"requests {requests.__version__}" if requests is not None else "urllib"


def _start_client(url: str, timeout: float) -> None:
    """Runs in each client process, once."""
    _target.update(url=url, timeout=timeout)


def _client_pid(_: int) -> int:
    time.sleep(0.05)  # long enough that every client process takes one
    import os

    return os.getpid()


def _send(uploads: list[Upload]) -> tuple[int, str]:
    url, timeout = _target["url"], _target["timeout"]
    if requests is not None:
        files = [("files", (u.filename, u.data, u.content_type)) for u in uploads]
        response = requests.post(url, files=files, timeout=timeout)
        return response.status_code, response.text
    body, content_type = multipart_body(uploads)
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def post(uploads: list[Upload]) -> tuple[float, str | None]:
    """One request, start to answer: ``(latency in ms, problem or None)``. In a client."""
    began = time.perf_counter()
    try:
        status, text = _send(uploads)
        problem = answer_problem(status, text, len(uploads))
    except Exception as exc:  # refused, reset, timed out: a failed request, not a crash
        problem = f"{type(exc).__name__}: {exc}"[:200]
    return (time.perf_counter() - began) * 1000, problem


def run(url: str, uploads: list[Upload], images_per_request: int, requests_total: int,
        clients: int, timeout: float = 300.0, seed: int = 0) -> dict[str, Any]:
    """Send ``requests_total`` requests from ``clients`` processes; the figures as a dict."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"only loopback targets are allowed, got {url!r}")
    for name, value in (("images_per_request", images_per_request),
                        ("requests", requests_total), ("clients", clients)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rng = random.Random(seed)
    jobs = [[rng.choice(uploads) for _ in range(images_per_request)]
            for _ in range(requests_total)]
    # fork: the client processes need nothing but this module, and a spawn per client would
    # cost seconds per run on a small machine. Spawn where fork does not exist.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(clients, initializer=_start_client, initargs=(url, timeout)) as pool:
        pool.map(_client_pid, range(clients), chunksize=1)  # every client is up
        started_at, began = time.time(), time.perf_counter()
        # chunksize 1: a client takes the next request only once its answer is in, so at
        # most `clients` requests are in flight (a closed loop, as the seed's clients).
        results = pool.map(post, jobs, chunksize=1)
        wall = time.perf_counter() - began
    problems = Counter(problem for _, problem in results if problem)
    return {
        "url": url, "images_per_request": images_per_request, "requests": requests_total,
        "clients": clients, "client_library": client_library(), "start_method": method,
        "started_at": started_at, "stopped_at": started_at + wall, "wall_s": wall,
        "latencies_ms": [round(latency, 3) for latency, _ in results],
        "failures": sum(problems.values()), "errors": dict(problems.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.seed.client",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the /predict URL (loopback only)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--requests", type=int, default=64, help="requests in the run")
    parser.add_argument("--clients", type=int, default=16, help="client processes")
    parser.add_argument("--image-kind", choices=IMAGE_KINDS, default="uni-colour")
    parser.add_argument("--image-size", default="224x224", help="WxH of generated images")
    parser.add_argument("--image-dir", default="", help="post these files instead")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        uploads = load_images(args.image_kind, parse_size(args.image_size), args.image_dir)
        result = run(args.url, uploads, args.images_per_request, args.requests, args.clients,
                     args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
