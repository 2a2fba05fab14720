"""The model's own throughput: forward passes on ready-made tensors, nothing else.

No HTTP, no decoding, no resizing, no pool: the ceiling the servers are measured against
(the GPU target is "spool with batching at >= 0.8x the raw model throughput at the
same precision"). The model is built by ``app.worker.ViTWorker.spawn``, so weights, device,
precision and thread count are set up exactly as in a server worker.

Run as a subprocess, so torch's threads and CUDA context die with it::

    python -m loadtest.raw_model --model vit_tiny_patch16_224 --device cpu \\
        --workers 2 --batch-sizes 1,8,16 --seconds 3 --output raw_model.json

``--no-tf32`` keeps fp32 matmuls in full fp32 on CUDA (the servers' default is TF32);
``--compile`` times the model as ``COMPILE=1`` serves it (compiled, warmed at batch 1 and the
largest batch size; docs/GPU.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .processes import log_tail, run_logged

if TYPE_CHECKING:  # app/ (pydantic, torch) is imported where a measurement runs, not by callers
    from app.worker import ViTWorker


def images_per_second(worker: ViTWorker, batch_size: int, seconds: float) -> float:
    """Forward passes of one batch shape for about ``seconds``, after two warm-up passes."""
    import torch

    cfg: Any = getattr(worker.model, "pretrained_cfg", {})  # timm's; untyped
    size = cfg.get("input_size", (3, 224, 224))
    batch = torch.randn(batch_size, *size).to(worker.device, worker.dtype)

    def sync() -> None:
        if worker.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(2):
            worker.forward(batch)
        sync()
        began, done = time.perf_counter(), 0
        while time.perf_counter() - began < seconds or done < 3 * batch_size:
            worker.forward(batch)
            done += batch_size
            if worker.device.type == "cuda" and done % (batch_size * 8) == 0:
                sync()  # keep the queue of launched kernels short so the clock stays honest
        sync()
        return done / (time.perf_counter() - began)


def measure(model: str, device: str, precision: str, batch_sizes: list[int],
            seconds: float, workers: int = 0, *, tf32: bool = True,
            compile: bool = False) -> dict[str, Any]:
    """Time one worker and scale by the number of workers the servers run.

    One worker, as the servers configure it: a GPU (times the GPUs), or on CPU a process with
    ``cpus // workers`` threads (times ``workers``). Timing all the CPU threads in one process
    instead would measure another configuration, and OpenMP barriers make a multi-thread
    forward collapse when another process takes one of the cores (docs/BENCHMARKS.md).
    """
    import torch

    from app.contract import WorkerConfig
    from app.runtime import TorchSettings
    from app.settings import available_cpus
    from app.worker import ViTWorker

    if device in ("cuda", "auto") and torch.cuda.is_available():
        replicas = workers or torch.cuda.device_count()
        device, threads = "cuda:0", 1
        scope = f"one worker on one GPU, times {replicas} worker(s)"
    else:
        replicas = workers or 1
        device, threads = "cpu", max(1, available_cpus() // replicas)
        scope = f"one worker with {threads} CPU thread(s), times {replicas} worker(s)"
    worker = ViTWorker()
    info = worker.spawn(WorkerConfig(worker_index=0, model_name=model, weights="random",
                                     device=device, precision=precision, num_threads=threads,
                                     max_image_pixels=1, log_level="warning",
                                     max_batch_size=max(batch_sizes),
                                     options=TorchSettings.model_construct(
                                         tf32=tf32, compile=compile, decode="pillow")))
    rates = {size: images_per_second(worker, size, seconds) for size in batch_sizes}
    best = max(rates, key=rates.__getitem__)
    return {
        "model": model, "device_name": info["device_name"], "precision": info["precision"],
        "tf32": info["tf32"], "compiled": info["compiled"],
        "warmup_seconds": info["warmup_seconds"], "scope": scope,
        "images_per_s_by_batch": {str(k): round(v, 2) for k, v in rates.items()},
        "best_batch_size": best, "best_images_per_s": round(rates[best] * replicas, 2),
    }


def command_line(model: str, output: Path, *, device: str = "auto", precision: str = "fp32",
                 batch_sizes: Sequence[int] = (1, 8, 32), seconds: float = 3.0,
                 workers: int = 0, tf32: bool = True, compile: bool = False) -> list[str]:
    """The command that runs ``measure`` in a process of its own (so torch's threads and CUDA
    context die with it) and writes its JSON to ``output``."""
    return [sys.executable, "-m", "loadtest.raw_model", "--model", model, "--device", device,
            "--precision", precision, "--tf32" if tf32 else "--no-tf32",
            "--batch-sizes", ",".join(map(str, batch_sizes)), "--seconds", f"{seconds:g}",
            "--workers", str(workers), "--output", str(output)] + (
                ["--compile"] if compile else [])


def run_child(command: list[str], output: Path, timeout: float,
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run a ``command_line`` (log beside ``output``); its result, or ``{"error": ...}`` when
    it failed or ran past ``timeout`` seconds."""
    log_path = output.with_suffix(".log")
    try:
        returncode = run_logged(command, log_path, timeout, env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if returncode != 0:
        return {"error": f"exited with {returncode}: {log_tail(log_path, lines=5)}"}
    return json.loads(output.read_text())  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    from app.runtime import PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m loadtest.raw_model", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 for fp32 matmuls on CUDA (the servers' default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile, as COMPILE=1")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=0,
                        help="workers the servers run (default: one per GPU, or 1 on CPU)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: never look for a download
    result = measure(args.model, args.device, args.precision,
                     [int(v) for v in args.batch_sizes.split(",")], args.seconds, args.workers,
                     tf32=args.tf32, compile=args.compile)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    code = main()
    # The JSON is written: spare the interpreter's exit a collection over every object torch
    # and timm created (about 1.5 s on 2 cores, in the caller's wait for this process).
    gc.freeze()
    sys.exit(code)
