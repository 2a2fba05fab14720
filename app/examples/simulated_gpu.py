"""A simulated GPU: answers as the echo worker does, after sleeping as long as a ViT-L/16
forward pass of the batch would take on one GPU, and uses no CPU meanwhile.

The cost of a batch of ``n`` images is ``FIXED_MS + n * PER_IMAGE_MS``. The defaults model a
ViT-L/16 at 224x224 on an RTX 4090 with mixed precision: timm's published inference
benchmark puts it near 950 img/s at large batches, about 1.05 ms per image, of which we take
1.0 ms per image plus 3 ms per batch for what does not shrink with the batch (launches,
synchronisation, the copy of the answers back): 19 ms for a batch of 16 (840 img/s), 4 ms for
a lone image. ``SIM_FIXED_MS`` and ``SIM_PER_IMAGE_MS`` (environment) change them.

Used by ``benchmarks/multigpu_bench.py`` to put several "GPUs" behind one server on a machine
that has none: the front end's limits then show as idle simulated GPUs. Serve it with::

    WORKER_CLASS=app.examples.simulated_gpu:SimulatedGPU DEVICE=cpu NUM_WORKERS=8 make serve
"""

from __future__ import annotations

import os
import time
from typing import Any

from app.contract import ImageInput, WorkerConfig
from app.examples.echo_worker import EchoWorker

FIXED_MS = 3.0
PER_IMAGE_MS = 1.0


class SimulatedGPU(EchoWorker):
    """The echo worker's request and answer; a batch sleeps as long as a GPU would compute
    it (no hashing: the answer's ``sha256`` is empty, so the worker costs no CPU)."""

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        self.fixed_s = float(os.environ.get("SIM_FIXED_MS", FIXED_MS)) / 1000
        self.per_image_s = float(os.environ.get("SIM_PER_IMAGE_MS", PER_IMAGE_MS)) / 1000
        return {"pid": os.getpid(), "device": f"simulated-gpu:{config.worker_index}",
                "model": "simulated ViT-L/16", "weights": "none"}

    def execute(self, item: ImageInput) -> dict[str, Any]:
        return self.execute_batch([item])[0]

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any]]:
        time.sleep(self.fixed_s + len(items) * self.per_image_s)
        return [{"format": item.format, "width": item.width, "height": item.height,
                 "bytes": len(item.data), "sha256": ""} for item in items]
