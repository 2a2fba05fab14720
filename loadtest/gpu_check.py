"""``python -m loadtest.gpu_check``: the GPU measurements, in one run of about 7 minutes.

For a GPU machine lent for minutes (``loadtest/gpu_check.sh`` installs what it lacks, then
runs this). In order, each step in a subprocess of its own, so CUDA state dies with it:

1. the bare model (``loadtest.raw_model``): images/s at fp32, TF32, bf16 and bf16 +
   torch.compile, at batch 1/32/128/256;
2. the server (``python -m app``, batching up to 256, bf16), 1 image per request, 64 and 256
   locust users, with JPEGs decoded on the GPU (``DECODE=device``) and by Pillow
   (``DECODE=pillow``): images/s, p50, p99, and the GPU's utilisation while it ran
   (``nvidia-smi`` sampled every 0.5 s);
3. ``results.md`` / ``results.json``: every figure, each server figure as a ratio of the bare
   model at bf16 (target: >= 0.8x).

A step that would end past ``--budget`` seconds is skipped and said so (the device runner
stops a command at 10 minutes). ``--smoke``: the same steps with vit_tiny on CPU in about a
minute (tests/tooling/test_gpu_check.py runs it): two CPU workers of one thread each, the
bare-model legs two at a time, 3 s load runs, compilation disabled (TORCHDYNAMO_DISABLE=1).

Writes at most six files in ``--output`` (the device runner returns 8): results.md,
results.json, gpu_util.csv, check.log, and everything else (locust and server logs, raw JSON)
packed in details.tgz.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .images import load_images, parse_size, request_bodies
from .raw_model import command_line as raw_model_command
from .raw_model import run_child
from .results import run_result, write_json
from .servers import ServerError, ServerProcess, ServerSpec
from .session import run_locust

RAW_LEGS = (  # name, precision, tf32, compile
    ("fp32", "fp32", False, False),
    ("tf32", "fp32", True, False),
    ("bf16", "bf16", True, False),
    ("bf16+compile", "bf16", True, True),
)
DECODES = ("device", "pillow")

# workers: None is one per GPU for the server, and one worker timed bare. The smoke mode runs
# 2 CPU workers of one torch thread each, as a GPU worker runs with one CPU thread: one worker
# with a thread per core stalls on OpenMP barriers whenever anything else (locust, the API
# process, other work on the machine) takes a core, and then answers nothing for seconds.
# raw_at_once: bare-model legs running at the same time (1-thread CPU legs share no device).
FULL = SimpleNamespace(model="vit_large_patch16_224", device="cuda", precision="bf16",
                       batch_sizes="1,32,128,256", raw_seconds=2.0, users=[64, 256],
                       duration=20.0, max_batch_size=256, image_size="320x240",
                       ready_timeout=300.0, raw_timeout=300.0, workers=None, raw_at_once=1)
SMOKE = SimpleNamespace(model="vit_tiny_patch16_224", device="cpu", precision="bf16",
                        batch_sizes="1,2", raw_seconds=0.1, users=[2, 4], duration=3.0,
                        max_batch_size=8, image_size="96x64", ready_timeout=90.0,
                        raw_timeout=120.0, workers=2, raw_at_once=2)


class Check:
    """The steps' shared state: where files go, the clock, the log, the results so far."""

    def __init__(self, args: argparse.Namespace, plan: SimpleNamespace) -> None:
        self.args, self.plan = args, plan
        self.output: Path = args.output
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"config": {**vars(plan), "smoke": args.smoke},
                                        "raw_model": {}, "server": [], "skipped": []}
        self.output.mkdir(parents=True, exist_ok=True)
        self.log_file = (self.output / "check.log").open("a")

    def log(self, line: str) -> None:
        line = f"[{time.monotonic() - self.started:5.0f} s] {line}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def has_time(self, step: str, needs: float) -> bool:
        left = self.args.budget - (time.monotonic() - self.started)
        if left >= needs:
            return True
        self.results["skipped"].append(step)
        self.log(f"SKIPPED {step}: {left:.0f} s left of the budget, it needs about {needs:.0f}")
        return False

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **extra}
        if self.args.smoke:
            env["TORCHDYNAMO_DISABLE"] = "1"  # compiling takes minutes on 2 CPU cores
        return env


def raw_model(check: Check) -> None:
    """Each setting of RAW_LEGS in a process of its own: one after another on a GPU (each
    needs the whole device), in this thread; the smoke mode's 1-thread CPU legs
    ``plan.raw_at_once`` at a time. A leg starts only if the budget still holds it when its
    turn comes."""
    plan = check.plan
    running: dict[Future[dict[str, Any]], str] = {}

    def collect(done: set[Future[dict[str, Any]]]) -> None:
        for future in done:
            name = running.pop(future)
            result = check.results["raw_model"][name] = future.result()
            check.log(f"raw model {name}: {result.get('images_per_s_by_batch') or result}")

    def start(command: list[str], output: Path) -> Future[dict[str, Any]]:
        if plan.raw_at_once > 1:
            return threads.submit(run_child, command, output, plan.raw_timeout, check.env())
        done: Future[dict[str, Any]] = Future()  # here, where Ctrl-C ends it at once
        done.set_result(run_child(command, output, plan.raw_timeout, check.env()))
        return done

    with ThreadPoolExecutor(plan.raw_at_once) as threads:
        for name, precision, tf32, compile_ in RAW_LEGS:
            while len(running) >= plan.raw_at_once:
                collect(wait(running, return_when=FIRST_COMPLETED).done)
            if not check.has_time(f"raw model {name}", 90 if compile_ else 40):
                continue
            output = check.work / f"raw_{name.replace('+', '_')}.json"
            command = raw_model_command(
                plan.model, output, device=plan.device, precision=precision, tf32=tf32,
                batch_sizes=[int(v) for v in plan.batch_sizes.split(",")],
                seconds=plan.raw_seconds, workers=plan.workers or 1, compile=compile_)
            running[start(command, output)] = name
        collect(wait(running).done)
    legs = check.results["raw_model"]  # in RAW_LEGS order, whichever leg finished first
    check.results["raw_model"] = {name: legs[name] for name, *_ in RAW_LEGS if name in legs}


def server(check: Check) -> None:
    plan = check.plan
    uploads = load_images("photo", parse_size(plan.image_size))
    spec = ServerSpec("spool-batch", f"app/, batching up to {plan.max_batch_size}", "app",
                      env={"MAX_BATCH_SIZE": str(plan.max_batch_size),
                           "MAX_BATCH_WAIT_MS": "0"})
    for decode in DECODES:
        needs = 60 + len(plan.users) * (plan.duration + 15)
        if not check.has_time(f"server DECODE={decode}", needs):
            continue
        env = {"MODEL_NAME": plan.model, "MODEL_WEIGHTS": "random", "DEVICE": plan.device,
               "PRECISION": plan.precision, "LOG_LEVEL": "warning", "API_KEY": "",
               "QUEUE_SIZE": str(4 * max(plan.users)), "DECODE": decode}
        if plan.workers:
            env["NUM_WORKERS"] = str(plan.workers)
        if check.args.smoke:
            env["TORCHDYNAMO_DISABLE"] = "1"
        process = ServerProcess(spec, env, check.work / f"server_{decode}.log")
        try:
            process.start()
            ready = process.wait_ready(plan.ready_timeout)
            process.warm_up(request_bodies(uploads, 1, variants=16), expected=1, concurrency=8)
            info = worker_info(process.url)
            check.log(f"server DECODE={decode}: ready ({ready.get('workers')} worker(s)), "
                      f"decode={info.get('decode')}, precision={info.get('precision')}")
            for users in plan.users:
                load = argparse.Namespace(users=users, duration=plan.duration,
                                          image_size=plan.image_size, image_dir="")
                began = time.time()
                stats, run_info = run_locust(process.url, 1, load,
                                             check.work / f"locust_{decode}_u{users}")
                run = run_result(stats, run_info, server=f"decode={decode}",
                                 images_per_request=1, repeat=1,
                                 planned_duration_s=plan.duration,
                                 load_average_1m=os.getloadavg()[0])
                row = {"decode": decode, "users": users, "began": began, "ended": time.time(),
                       "worker_decode": info.get("decode"), **asdict(run)}
                check.results["server"].append(row)
                check.log(f"  {users} users: {run.images_per_s:.1f} img/s, p50 "
                          f"{run.latency_p50_ms:.0f} ms, p99 {run.latency_p99_ms:.0f} ms, "
                          f"{run.failures}/{run.requests} failed")
        except ServerError as exc:
            check.results["server"].append({"decode": decode, "error": str(exc)[:500]})
            check.log(f"server DECODE={decode}: ERROR {exc}")
        finally:
            process.stop()


def worker_info(url: str) -> dict[str, Any]:
    import urllib.request

    # Never through a proxy a shell may name: the server is on 127.0.0.1.
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with local.open(f"{url}/v1/model", timeout=10) as response:
        workers = json.loads(response.read()).get("workers") or [{}]
    return workers[0]  # type: ignore[no-any-return]


class GpuSampler:
    """``nvidia-smi`` every 0.5 s into gpu_util.csv while the servers run; nothing without it."""

    def __init__(self, path: Path) -> None:
        self.path, self.process = path, None
        if shutil.which("nvidia-smi"):
            self.file = path.open("w")
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=self.file, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.file.close()

    def mean_between(self, began: float, ended: float) -> float | None:
        """Mean utilisation (%) of the samples taken between two wall-clock times."""
        from datetime import datetime

        if not self.path.exists():
            return None
        values = []
        for line in self.path.read_text().splitlines():
            try:
                stamp, util, _ = (f.strip() for f in line.split(","))
                at = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                continue
            if began <= at <= ended:
                values.append(float(util))
        return round(sum(values) / len(values), 1) if values else None


def markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [f"# GPU check: {config['model']} on {config['device']}"
             + (" (SMOKE: CPU dry run, not a measurement)" if config["smoke"] else ""), "",
             "## Bare model (forward pass only), images/s", ""]
    sizes = config["batch_sizes"].split(",")
    lines += ["| setting | " + " | ".join(f"batch {s}" for s in sizes) + " | device |",
              "|---" * (len(sizes) + 2) + "|"]
    for name, result in results["raw_model"].items():
        rates = result.get("images_per_s_by_batch") or {}
        cells = [f"{rates[s]:.1f}" if s in rates else "-" for s in sizes]
        where = result.get("device_name") or result.get("error", "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {where} |")
    bf16 = results["raw_model"].get("bf16", {}).get("best_images_per_s")
    lines += ["", f"## Server: batching up to {config['max_batch_size']}, "
              f"{config['precision']}, 1 image per request", "",
              "| decode | users | images/s | x bare bf16 best | p50 ms | p99 ms | failed | "
              "GPU util % |", "|---|---|---|---|---|---|---|---|"]
    for row in results["server"]:
        if "error" in row:
            lines.append(f"| {row['decode']} | - | ERROR: {row['error'][:120]} | | | | | |")
            continue
        ratio = f"{row['images_per_s'] / bf16:.2f}" if bf16 else "-"
        lines.append(f"| {row['decode']} (worker: {row['worker_decode']}) | {row['users']} | "
                     f"{row['images_per_s']:.1f} | {ratio} | {row['latency_p50_ms']:.0f} | "
                     f"{row['latency_p99_ms']:.0f} | {row['failures']}/{row['requests']} | "
                     f"{'-' if row.get('gpu_util_mean') is None else row['gpu_util_mean']} |")
    if results["skipped"]:
        lines += ["", "Skipped for time: " + ", ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="vit_tiny on CPU, seconds")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for all steps; a step that does not fit is skipped")
    parser.add_argument("--skip", default="", help="comma-separated: raw, server")
    args = parser.parse_args(argv)
    check = Check(args, SMOKE if args.smoke else FULL)
    check.log(f"gpu_check: {'smoke ' if args.smoke else ''}{check.plan.model} on "
              f"{check.plan.device}, budget {args.budget:g} s, work folder {check.work}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        if "raw" not in skip:
            raw_model(check)
        if "server" not in skip:
            sampler = GpuSampler(check.output / "gpu_util.csv")
            try:
                server(check)
            finally:
                sampler.stop()
            for row in check.results["server"]:
                if "began" in row:
                    row["gpu_util_mean"] = sampler.mean_between(row["began"], row["ended"])
    finally:
        check.results["elapsed_s"] = round(time.monotonic() - check.started, 1)
        write_json(check.output / "results.json", check.results)
        table = markdown(check.results)
        (check.output / "results.md").write_text(table)
        with tarfile.open(check.output / "details.tgz", "w:gz") as archive:
            archive.add(check.work, arcname="details")
        shutil.rmtree(check.work, ignore_errors=True)
        check.log(f"gpu_check: done in {check.results['elapsed_s']:.0f} s; wrote {args.output}")
        check.log_file.close()
        print(table, flush=True)
    # A run without one answer is a failure on a GPU; on a CPU shared with other work (the
    # smoke mode's tests) a few seconds can pass without one, and the other runs tell.
    failed = [r for r in check.results["server"] if "error" in r or r.get("failures")
              or (not r.get("requests") and not args.smoke)]
    broken = [n for n, r in check.results["raw_model"].items() if "error" in r]
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
