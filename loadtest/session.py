"""The servers of one comparison and the load runs against them.

``Session`` launches the servers (``loadtest.servers.ServerProcess``), waits for their
workers and warms them up, measures one run at a time and notes every failure in the
summary's ``servers`` entries; a server in error is stopped and its remaining runs skipped.
A run is either headless locust (``run_locust``: users for a duration) or the seed's client
(``run_seed_client``: a fixed number of requests from blocking client processes), each in a
process group of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import results
from .images import Upload, request_bodies
from .processes import log_tail, run_logged
from .servers import ServerError, ServerProcess, server_specs

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def run_locust(url: str, ipr: int, args: argparse.Namespace,
               prefix: Path) -> tuple[list[Any], dict[str, Any]]:
    """One headless locust run in its own process group.

    Returns:
        ``(stats, run_info)``: locust's JSON stats entries, and the locustfile's
        ``{"stopped_at": ..., "errors": {error: occurrences}}``.
    """
    # A bound on requests too, for a server that fails fast: 100 requests/s per user is far
    # above what any model server here answers.
    max_requests = int(args.users * args.duration * 100)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        # -r is users started per second: at -r = -u the last user starts a second late, and
        # --reset-stats (which drops the ramp) would cut that second off a short run.
        "-u", str(args.users), "-r", str(10 * args.users), "-t", f"{args.duration:g}s",
        "--host", url, "--reset-stats", "--only-summary", "--loglevel", "WARNING",
        "--json-file", str(prefix), "--csv", str(prefix),
        "--images-per-request", str(ipr), "--image-size", args.image_size,
        "--max-requests", str(max_requests), "--run-info", f"{prefix}_info.json",
    ]
    if args.image_dir:
        command += ["--image-dir", str(args.image_dir)]
    log_path = prefix.with_suffix(".log")
    try:
        returncode = run_logged(command, log_path, timeout=args.duration + 60)
    except subprocess.TimeoutExpired:
        raise ServerError(f"locust did not finish within {args.duration + 60:g} s") from None
    # 1 means "some request failed", which the stats report; anything else is locust's own.
    json_path = prefix.parent / f"{prefix.name}.json"
    if returncode not in (0, 1) or not json_path.exists():
        raise ServerError(f"locust exited with {returncode}:\n{log_tail(log_path)}")
    info_path = prefix.parent / f"{prefix.name}_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return json.loads(json_path.read_text()), info


def run_seed_client(url: str, ipr: int, args: argparse.Namespace, prefix: Path) -> Any:
    """One run of the seed's load (``loadtest.seed.client``) in its own process group.

    Returns:
        The client's JSON: request count, failures, wall time, every latency.
    """
    output = prefix.parent / f"{prefix.name}.json"
    command = [sys.executable, "-m", "loadtest.seed.client", "--url", f"{url}/predict",
               "--images-per-request", str(ipr), "--requests", str(args.requests),
               "--clients", str(args.users), "--image-kind", args.image_kind,
               "--image-size", args.image_size, "--timeout", f"{args.run_timeout:g}",
               "--output", str(output)]
    if args.image_dir:
        command += ["--image-dir", str(args.image_dir)]
    log_path = prefix.parent / f"{prefix.name}.log"
    try:
        returncode = run_logged(command, log_path, timeout=args.run_timeout + 30)
    except subprocess.TimeoutExpired:
        raise ServerError(f"the seed client did not finish within "
                          f"{args.run_timeout + 30:g} s") from None
    # 1 means "some request failed", which the JSON reports.
    if returncode not in (0, 1) or not output.exists():
        raise ServerError(f"the seed client exited with {returncode}:\n{log_tail(log_path)}")
    return json.loads(output.read_text())



class Session:
    """The servers of one comparison, the runs made so far, and what is known of each server
    (``info``: the summary's ``servers`` entries, filled in as they start, run and stop)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], uploads: list[Upload],
                 info: dict[str, dict[str, Any]], raw: Path) -> None:
        self.args, self.env, self.uploads, self.info, self.raw = args, env, uploads, info, raw
        self.specs = server_specs(args.max_batch_size, args.max_batch_wait_ms)
        self.up: dict[str, ServerProcess] = {}
        self.launched_at: dict[str, float] = {}
        self.runs: list[results.RunResult] = []
        self.total = len(args.servers) * len(args.images_per_request) * args.repeats
        self.started = time.monotonic()

    def launch(self, name: str) -> None:
        """Start a server process; return at once (its model loads in the background)."""
        server = ServerProcess(self.specs[name], self.env, self.raw / f"{name}.server.log")
        self.up[name] = server
        self.launched_at[name] = time.monotonic()
        server.start()

    def bring_up(self, name: str) -> bool:
        """Wait for all the workers of a launched server, warm it up; False (and noted) on
        error."""
        info, server = self.info[name], self.up[name]
        try:
            readiness = server.wait_ready(self.args.ready_timeout)
            info["ready_after_s"] = round(time.monotonic() - self.launched_at[name], 1)
            info["workers"] = workers = int(readiness.get("workers") or 1)
            for ipr in self.args.images_per_request:
                server.warm_up(request_bodies(self.uploads, ipr, variants=4 * workers),
                               expected=ipr, concurrency=2 * workers)
        except ServerError as exc:
            self.fail(name, exc)
            return False
        print(f"  {name}: ready with {workers} worker(s) {info['ready_after_s']} s after its "
              "start", flush=True)
        return True

    def measure(self, name: str, ipr: int, repeat: int) -> None:
        """One run of the load against a running server, with its progress line."""
        prefix = self.raw / f"{name}_ipr{ipr}_r{repeat}"
        try:
            if self.args.load == "seed":
                client = run_seed_client(self.up[name].url, ipr, self.args, prefix)
                run = results.seed_run_result(client, server=name, repeat=repeat,
                                             load_average_1m=os.getloadavg()[0])
            else:
                stats, run_info = run_locust(self.up[name].url, ipr, self.args, prefix)
                run = results.run_result(
                    stats, run_info, server=name, images_per_request=ipr, repeat=repeat,
                    planned_duration_s=self.args.duration, load_average_1m=os.getloadavg()[0])
        except ServerError as exc:
            self.fail(name, exc)
            return
        self.runs.append(run)
        print(f"[{len(self.runs)}/{self.total}] {name} {ipr} img/req repeat {repeat}: "
              f"{run.images_per_s:.1f} img/s, {run.requests_per_s:.1f} req/s, "
              f"p50 {run.latency_p50_ms:.0f} ms, p99 {run.latency_p99_ms:.0f} ms, "
              f"{run.failures}/{run.requests} failed "
              f"({time.monotonic() - self.started:.0f} s elapsed)", flush=True)
        if run.top_error:
            print(f"    most frequent failure: {run.top_error}", flush=True)

    def fail(self, name: str, exc: ServerError) -> None:
        """Note the error and stop the server: its remaining runs are skipped."""
        self.info[name].setdefault("error", str(exc).splitlines()[0])
        print(f"  {name}: ERROR {exc}", flush=True)
        self.shut_down(name)

    def shut_down_all(self) -> None:
        """Stop every server still up, all at once: each stop is a SIGTERM and a bounded wait
        for that server's own exit, so there is no reason to wait for them one by one."""
        names = list(self.up)
        if names:
            with ThreadPoolExecutor(len(names)) as threads:
                list(threads.map(self.shut_down, names))

    def shut_down(self, name: str) -> None:
        server = self.up.pop(name, None)
        if server is None:
            return
        returncode, leftovers = server.stop()
        self.info[name]["exit_code"] = returncode
        if leftovers:
            self.info[name]["killed_leftover_pids"] = leftovers
            print(f"  {name}: killed {len(leftovers)} process(es) left after its exit",
                  flush=True)
