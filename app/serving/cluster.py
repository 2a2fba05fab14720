"""Serving from a Ray cluster (``POOL_BACKEND=ray``): how many workers, with what resources.

With the Ray backend every worker is a Ray actor somewhere in the cluster at ``RAY_ADDRESS``.
The server plans one worker per GPU of the *whole cluster* (each actor asks Ray for one GPU;
Ray sets ``CUDA_VISIBLE_DEVICES`` so the actor's GPU is its ``cuda:0``), or CPU workers when
the cluster has no GPU. Ray is imported only here, and only with that setting.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("app")


def connect(address: str | None) -> dict[str, float]:
    """Join the cluster (or start a local Ray) and return its total resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        logger.info("connecting to Ray at %s", address or "a new local instance")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def plan(resources: dict[str, float], *, device: str, num_workers: int | None
         ) -> tuple[int, bool, dict[str, Any]]:
    """(worker count, on GPU?, Ray actor options) for a cluster with these resources.

    One worker per GPU in the cluster unless NUM_WORKERS says otherwise; with no GPU (or
    DEVICE=cpu), NUM_WORKERS CPU workers (default: one per node's worth of 2 CPUs, at least 1)
    each reserving the CPUs its torch threads use.
    """
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise ValueError("DEVICE=cuda but the Ray cluster has no GPU")
    if gpus and device != "cpu":
        return (num_workers or gpus), True, {"num_gpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    count = num_workers or max(1, cpus // 2)
    return count, False, {"num_cpus": max(1, cpus // count)}
