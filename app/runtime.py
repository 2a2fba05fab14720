"""Helpers for torch workers: threads, device and precision, compile; preparing image batches.

Everything here runs in the worker process, except ``TorchSettings``, which the server reads
from the environment in the API process (a worker's ``settings_model``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings

from .contract import InvalidImageError, WorkerConfig
from .images import configure_decoder, decode_rgb
from .ops.logs import configure_worker_logging

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("app.runtime")

T = TypeVar("T")
R = TypeVar("R")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TorchSettings(BaseSettings):
    """How a torch worker uses its device: ``DECODE``, ``COMPILE``, ``TF32``, ``PREPARE_CHUNK``.

    The ``settings_model`` of ``app.worker.ViTWorker`` (docs/GPU.md). Plain names, no prefix:
    they describe the device, not one model.
    """

    decode: Literal["auto", "device", "pillow"] = Field(
        "auto", description="where JPEGs are decoded and resized: auto = on the device when "
        "it is a GPU, else Pillow; device = torchvision.io.decode_jpeg and tensor ops on the "
        "worker's device (also on CPU, for tests); pillow = Pillow in threads")
    compile: bool = Field(
        False, description="torch.compile the model at start-up, warmed up at batch 1 and "
        "MAX_BATCH_SIZE so that no request pays for compilation")
    tf32: bool = Field(
        True, description="fp32 matmuls and convolutions in TF32 on CUDA (Ampere and later)")
    prepare_chunk: int = Field(
        0, ge=0, description="images per forward pass while the rest of a batch is still "
        "decoded by Pillow, so decoding overlaps the GPU's compute; 0 = 64 on CUDA, the whole "
        "batch on CPU")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype for ``PRECISION`` on ``device``: ``auto`` is bf16 on a GPU that has it
    (Ampere and later), else fp32; half precisions fall back to fp32 on CPU."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu" and dtype != torch.float32:
        logger.warning("PRECISION=%s is for GPUs; using fp32 on CPU", precision)
        return torch.float32
    return dtype


def compile_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes ``COMPILE=1`` warms up: 1 and ``max_batch_size``.

    torch.compile specialises a dimension of size 1, so batch 1 gets a graph of its own; the
    first other size gets a graph with a dynamic batch dimension (``dynamic=True``) that
    serves every size from 2 up. Two compilations at start-up cover every batch the pool can
    form (1 to max_batch_size), with no padding. Per-size static graphs (or padding to powers
    of two) would need up to 9 compilations of ViT-L/16 for MAX_BATCH_SIZE=256, or waste up
    to half of a padded batch's compute; the large matmuls and attention, which are most of
    a ViT's time, run the same library kernels either way.
    """
    return sorted({1, max(1, max_batch_size)})


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
        self.settings = (config.options if isinstance(config.options, TorchSettings)
                         else TorchSettings.model_construct())  # the defaults, not the env
        self.dtype = resolve_precision(config.precision, self.device)
        if self.device.type == "cuda":
            # TF32 keeps fp32's range with a 10-bit mantissa in matmuls: several times fp32's
            # speed on tensor cores. Process-wide; off with TF32=false.
            torch.backends.cuda.matmul.allow_tf32 = self.settings.tf32
            torch.backends.cudnn.allow_tf32 = self.settings.tf32
        self.max_batch_size = config.max_batch_size
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
            "tf32": self.device.type == "cuda" and self.settings.tf32,
            "num_threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in model.parameters()),
        }

    def prepare_model(self, model: torch.nn.Module, input_size: tuple[int, ...]
                      ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
        """The model's forward, compiled with ``COMPILE=1``, after warm-up passes.

        Returns:
            ``(forward, info)``: the callable to run batches through, and what to add to the
            worker's ``/v1/model`` entry (``compiled``, the warm-up sizes and seconds).
        """
        import time

        import torch

        forward: Callable[[torch.Tensor], torch.Tensor] = model
        sizes = [1]
        if self.settings.compile:
            forward = torch.compile(model, dynamic=True)
            sizes = compile_batch_sizes(self.max_batch_size)
        started = time.monotonic()
        # The first request must not pay for lazy initialisation, nor for compilation.
        with torch.inference_mode():
            for size in sizes:
                forward(torch.zeros((size, *input_size), device=self.device, dtype=self.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        info = {"compiled": self.settings.compile, "warmup_batch_sizes": sizes,
                "warmup_seconds": round(time.monotonic() - started, 2)}
        return forward, info


class ImageBatches:
    """Encoded images -> model inputs on the worker's device, in chunks that overlap compute.

    Runs in the worker process. Per batch of ``ImageInput``-like items (``.data``,
    ``.format``, ``.width``, ``.height``):

    * with the device decoder on (``DECODE``, see ``TorchSettings``), the JPEGs it takes are
      decoded in one batched call on the device, then resized, cropped and normalised there
      (``app.device_images``): the first chunk, ready almost at once;
    * every other image (and a JPEG the device could not decode, so that its error message
      is Pillow's, as on CPU) is decoded and resized by Pillow in the decode threads; its
      uint8 pixels are copied to the device from pinned memory with ``non_blocking`` (no
      pinning on CPU) and normalised there, in chunks of ``PREPARE_CHUNK`` images.

    The caller runs each chunk through the model as soon as it is yielded: on CUDA the forward
    pass only queues kernels, so the threads decode the next chunk while the GPU computes
    this one, and the one synchronisation is the caller's final copy of the results.
    """

    def __init__(self, runtime: TorchRuntime, transform: Callable[[Any], Any]) -> None:
        from .device_images import DeviceTransform

        self.runtime, self.transform = runtime, transform
        self.split = DeviceTransform.from_transform(transform)
        cuda = runtime.device.type == "cuda"
        mode = runtime.settings.decode
        self.decode_on_device = mode == "device" or (mode == "auto" and cuda)
        if self.decode_on_device and self.split is None:
            logger.warning("DECODE=%s: the model's transform is not Resize, CenterCrop, "
                           "ToTensor, Normalize; decoding with Pillow", mode)
            self.decode_on_device = False
        self.pin = cuda
        # 64: a chunk big enough to keep a large GPU busy (to be measured on a GPU).
        self.chunk = runtime.settings.prepare_chunk or (64 if cuda else 0)

    def info(self) -> dict[str, Any]:
        return {"decode": "device" if self.decode_on_device else "pillow",
                "prepare_chunk": self.chunk or None, "pinned_memory": self.pin}

    def batches(self, items: list[Any], errors: list[InvalidImageError | None]
                ) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Yield ``(inputs, positions)``: a model input batch on the device in the model's
        dtype and the positions in ``items`` of its rows. An image that does not decode gets
        an ``InvalidImageError`` at its position in ``errors`` instead."""
        from .device_images import decodable_on_device

        device_ok: list[int] = []
        if self.decode_on_device:
            device_ok = [i for i, item in enumerate(items)
                         if item.width * item.height <= self.runtime.max_image_pixels
                         and decodable_on_device(item.data, item.format)]
        decoded = self._decode_on_device([items[i] for i in device_ok])
        on_device = [(i, t) for i, t in zip(device_ok, decoded, strict=True) if t is not None]
        taken = {i for i, _ in on_device}
        rest = [i for i in range(len(items)) if i not in taken]
        # Pillow's share goes to the threads first: they decode while the device does.
        results = self._start_pillow([items[i] for i in rest])
        if on_device:
            yield self._device_inputs([t for _, t in on_device]), [i for i, _ in on_device]
        chunk = self.chunk or len(rest) or 1
        for start in range(0, len(rest), chunk):
            tensors, positions = [], []
            for offset, index in enumerate(rest[start:start + chunk]):
                prepared = results(start + offset)
                if isinstance(prepared, InvalidImageError):
                    errors[index] = prepared
                else:
                    tensors.append(prepared)
                    positions.append(index)
            if tensors:
                yield self._host_inputs(tensors), positions

    def _decode_on_device(self, items: list[Any]) -> list[torch.Tensor | None]:
        from .device_images import decode_jpegs, geometry_on_device

        if not items:
            return []
        decoded = decode_jpegs([item.data for item in items], self.runtime.device)
        assert self.split is not None
        good = [t for t in decoded if t is not None]
        shaped = iter(geometry_on_device(self.split, good))
        return [None if t is None else next(shaped) for t in decoded]

    def _device_inputs(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        import torch

        assert self.split is not None
        return self.split.normalize(torch.stack(pixels), self.runtime.dtype)

    def _start_pillow(self, items: list[Any]) -> Callable[[int], Any]:
        """Start preparing ``items`` with Pillow; returns ``result(position)``, which waits."""
        split, limit = self.split, self.runtime.max_image_pixels

        def prepare(item: Any) -> Any:
            try:
                image = decode_rgb(item.data, max_pixels=limit)
            except InvalidImageError as exc:
                return exc
            return split.geometry_pil(image) if split is not None else self.transform(image)

        threads = self.runtime.threads
        if threads is None or len(items) < 2:
            return lambda position: prepare(items[position])  # in order, as chunks are taken
        futures: list[Future[Any]] = [threads.submit(prepare, item) for item in items]
        return lambda position: futures[position].result()

    def _host_inputs(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Stack on the host (into pinned memory on CUDA), copy without blocking, normalise."""
        import torch

        staged = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype,
                             pin_memory=self.pin)
        torch.stack(tensors, out=staged)
        # The caching host allocator keeps a pinned block until its copy has completed, so
        # a later chunk never overwrites pixels still in flight.
        moved = staged.to(self.runtime.device, non_blocking=self.pin)
        if self.split is not None:
            return self.split.normalize(moved, self.runtime.dtype)
        return moved.to(self.runtime.dtype)
