"""The command line of ``python -m loadtest.compare``: three presets and their overrides.

``--preset cpu`` (the default), ``--preset gpu`` and ``--preset seed`` each fix every knob
(model, servers, load, users, repeats, images per request...); any knob given on the command
line overrides the preset's value. ``parse_args`` fills the rest from the preset and rejects
combinations that cannot run (an unknown server, a torchvision model for a timm-only server,
a precision the seed-shaped servers do not have) before anything starts.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .images import IMAGE_KINDS, parse_size
from .processes import ROOT
from .seed.model import split_model_name
from .servers import server_specs

DESCRIPTION = "``python -m loadtest.compare``: the seed's benchmark, rerun on this machine."
DEFAULT_SERVERS = ("simple", "mp", "spool", "spool-batch")
SEED_SERVERS = ("seed-simple", "seed-mp", "seed-spool", "dp")
# What our presets share: locust drives the load for --duration seconds per run.
LOCUST_LOAD = dict(servers=DEFAULT_SERVERS, load="locust", requests=64, image_kind="photo",
                   image_size="320x240", raw_model=True, sequential=False, run_timeout=600.0)

PRESETS: dict[str, dict[str, Any]] = {
    # About 7 minutes on 2 cores: 4 servers x 2 settings x 3 repeats x (15 s + locust start)
    # plus 4 server starts.
    "cpu": dict(LOCUST_LOAD, model="vit_tiny_patch16_224", weights="random", device="cpu",
                workers=2, precision="fp32", users=32, duration=15, repeats=3,
                images_per_request=[1, 4], max_batch_size=16, max_batch_wait_ms=0.0,
                ready_timeout=180, raw_batch_sizes=[1, 8, 16]),
    # Our servers at the seed's scale: ViT-L/16 (timm), one worker per GPU, 100 users (the
    # seed README's figure), 5 repeats. Random weights: throughput does not depend on them,
    # and no download is needed.
    "gpu": dict(LOCUST_LOAD, model="vit_large_patch16_224", weights="random", device="cuda",
                workers=0, precision="fp32", users=100, duration=60, repeats=5,
                images_per_request=[1, 4, 8, 16, 32], max_batch_size=32,
                max_batch_wait_ms=0.0, ready_timeout=600, raw_batch_sizes=[1, 8, 32, 64, 128]),
    # stateful-pool 0.3.2's benchmark as its code ran it: its servers and model (torchvision
    # vit_l_16, random weights after manual_seed(42), fp32), 64 requests per run from 16
    # blocking client processes, uni-colour 224x224 PNGs, 5 runs per setting, one server at
    # a time. No bare-model timing: the seed had none, and raw_model.py times timm models.
    "seed": dict(model="torchvision:vit_l_16", weights="random", device="cuda", workers=0,
                 precision="fp32", servers=SEED_SERVERS, load="seed", users=16, requests=64,
                 duration=60, repeats=5, images_per_request=[1, 4, 8, 16, 32],
                 image_kind="uni-colour", image_size="224x224", raw_model=False,
                 sequential=True, max_batch_size=32, max_batch_wait_ms=0.0, ready_timeout=600,
                 raw_batch_sizes=[1, 8, 32, 64, 128], run_timeout=600.0),
}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,8, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare", description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    knobs = parser.add_argument_group("overrides of the preset (default: the preset's value)")
    knobs.add_argument("--servers", help="comma-separated, from: " + ", ".join(
        server_specs(1, 0)) + " (cpu, gpu: " + ",".join(DEFAULT_SERVERS) + "; seed: "
        + ",".join(SEED_SERVERS) + ")")
    knobs.add_argument("--model", help="a timm name (timm:NAME also works), or "
                       "torchvision:NAME for the seed-shaped servers only (cpu: "
                       "vit_tiny_patch16_224, gpu: vit_large_patch16_224 from timm, seed: "
                       "torchvision:vit_l_16)")
    knobs.add_argument("--weights", help="random | auto | pretrained | checkpoint path")
    knobs.add_argument("--device", choices=("cpu", "cuda", "auto"))
    knobs.add_argument("--workers", type=int, help="model workers (0: one per GPU)")
    knobs.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    knobs.add_argument("--load", choices=("locust", "seed"),
                       help="locust: users for --duration seconds; seed: --requests requests "
                       "from --users blocking client processes (loadtest/seed/client.py)")
    knobs.add_argument("--users", type=int,
                       help="concurrent closed-loop clients (locust users or client processes)")
    knobs.add_argument("--duration", type=float, help="seconds per locust run")
    knobs.add_argument("--requests", type=int, help="requests per run of the seed's load")
    knobs.add_argument("--run-timeout", type=float,
                       help="seconds a run of the seed's load may take before it is killed")
    knobs.add_argument("--repeats", type=int, help="runs per (server, images per request)")
    knobs.add_argument("--images-per-request", type=int_list, help="e.g. 1,4,8")
    knobs.add_argument("--max-batch-size", type=int, help="spool-batch's MAX_BATCH_SIZE")
    knobs.add_argument("--max-batch-wait-ms", type=float, help="spool-batch's MAX_BATCH_WAIT_MS")
    knobs.add_argument("--ready-timeout", type=float, help="seconds to wait for every worker")
    knobs.add_argument("--raw-batch-sizes", type=int_list,
                       help="batch sizes at which to time the bare model (the ceiling row)")
    knobs.add_argument("--raw-model", action=argparse.BooleanOptionalAction,
                       help="time the bare model's forward pass first (no HTTP, no decoding; "
                       "timm models only)")
    parser.add_argument("--raw-seconds", type=float, default=3.0,
                        help="seconds of forward passes per raw batch size")
    knobs.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                       help="run one server at a time (all of one server's runs, then the "
                       "next; the seed preset's way) instead of keeping every server up and "
                       "interleaving the runs; also for GPUs without memory for every "
                       "server's model at once")
    parser.add_argument("--image-dir", default="", help="post these images, not generated ones")
    knobs.add_argument("--image-kind", choices=IMAGE_KINDS,
                       help="generated images: noisy gradient JPEGs or one-colour PNGs")
    knobs.add_argument("--image-size", help="WxH of generated images")
    parser.add_argument("--output", type=Path,
                        help="results folder (default: results/loadtest/<preset>-<time>)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.servers, str):
        args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.servers = list(args.servers)
    known = server_specs(args.max_batch_size, args.max_batch_wait_ms)
    unknown = [s for s in args.servers if s not in known]
    if unknown or not args.servers:
        parser.error(f"unknown server(s) {unknown}; choose from {', '.join(known)}")
    for name in ("users", "repeats", "max_batch_size", "requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.run_timeout <= 0:
        parser.error("--duration and --run-timeout must be > 0")
    try:
        parse_size(args.image_size)
        library, _ = split_model_name(args.model)
    except ValueError as exc:
        parser.error(str(exc))
    timm_only = [s for s in args.servers if not known[s].seed_model]
    if library == "torchvision" and (timm_only or args.raw_model):
        parser.error(f"{args.model} is a torchvision model, but "
                     f"{', '.join(timm_only) or 'the bare-model timing'} load timm models only: "
                     "give a timm name (vit_large_patch16_224 is ViT-L/16) or leave them out "
                     "(--servers, --no-raw-model)")
    seed_shaped = [s for s in args.servers if known[s].seed_model]
    if seed_shaped and args.precision != "fp32":
        parser.error(f"{', '.join(seed_shaped)} run fp32 only, as the seed did; "
                     f"drop --precision {args.precision} or those servers")
    if args.output is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        args.output = ROOT / "results" / "loadtest" / f"{args.preset}-{stamp}"
    return args
