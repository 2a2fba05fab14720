"""Helpers for torch workers: threads, device and precision; decoding a batch in threads.

Everything here runs in the worker process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from .contract import InvalidImageError, WorkerConfig
from .images import configure_decoder, decode_rgb
from .logs import configure_worker_logging

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("app.runtime")

T = TypeVar("T")
R = TypeVar("R")


class TorchRuntime:
    """The torch side of ``spawn``: logging, threads, device, dtype, a decode thread pool.

    Runs in the worker process. ``TorchRuntime(config)`` at the top of ``spawn``, then
    ``runtime.device`` / ``runtime.dtype`` for the model and ``runtime.map`` for per-item
    preprocessing.
    """

    def __init__(self, config: WorkerConfig) -> None:
        import torch

        configure_worker_logging(config.worker_index, config.log_level)
        # Workers share the machine's cores (preprocessing runs on CPU on GPU workers too):
        # each gets its slice, or they thrash.
        torch.set_num_threads(config.num_threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # torch allows it once per process (loadtest's simple server has replicas)
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))
        self.device = torch.device(config.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[config.precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            logger.warning("PRECISION=%s is for GPUs; using fp32 on CPU", config.precision)
            self.dtype = torch.float32
        self.max_image_pixels = config.max_image_pixels
        configure_decoder()
        # Pillow and torchvision release the GIL while decoding and resizing: a batch's
        # images are prepared in parallel threads, which keeps a GPU fed (one process per GPU).
        self.threads = (ThreadPoolExecutor(config.num_threads, "prepare")
                        if config.num_threads > 1 else None)

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``[fn(item) for item in items]``, in the decode threads when there are several."""
        if self.threads is not None and len(items) > 1:
            return list(self.threads.map(fn, items))
        return [fn(item) for item in items]

    def decode_images(self, items: list[Any], transform: Callable[[Any], Any]
                      ) -> tuple[list[Any], list[int], list[InvalidImageError | None]]:
        """Decode each item's ``.data`` to RGB and apply ``transform``, in threads.

        Returns:
            ``(outputs, indices, errors)``: the transformed images that decoded and their
            positions in ``items``; ``errors`` has an ``InvalidImageError`` at each position
            that did not decode (fail that item alone) and None elsewhere.
        """
        def prepare(item: Any) -> Any:
            try:
                image = decode_rgb(item.data, max_pixels=self.max_image_pixels)
            except InvalidImageError as exc:
                return exc
            return transform(image)

        outputs, indices = [], []
        errors: list[InvalidImageError | None] = [None] * len(items)
        for index, prepared in enumerate(self.map(prepare, items)):
            if isinstance(prepared, InvalidImageError):
                errors[index] = prepared
            else:
                outputs.append(prepared)
                indices.append(index)
        return outputs, indices, errors

    def info(self, model: torch.nn.Module) -> dict[str, Any]:
        """The part of a worker's ``/v1/model`` entry every torch model shares."""
        import torch

        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" else "cpu"),
            "precision": str(self.dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in model.parameters()),
        }
