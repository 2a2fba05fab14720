"""What crosses the process boundary between the API process and a worker.

Kept free of FastAPI and torch so that both sides import it cheaply: the API process builds
these objects, the worker process unpickles them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker's ``spawn`` needs; built from the settings, one per worker.

    Attributes:
        worker_index: position of this worker in the pool (0-based), for logs.
        model_name: a timm model name (``MODEL_NAME``).
        weights: ``auto``, ``pretrained``, ``random`` or a checkpoint path (``MODEL_WEIGHTS``).
        device: a torch device string, ``cpu`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (half precision only on CUDA).
        num_threads: torch intra-op threads for this worker (CPU only; GPUs use 1).
        max_image_pixels: the decoder's pixel limit, the same one the API process checked.
        log_level: ``LOG_LEVEL`` of the server, for the worker's own log lines.
    """

    worker_index: int
    model_name: str
    weights: str
    device: str
    precision: str
    num_threads: int
    max_image_pixels: int
    log_level: str = "info"


@dataclass(frozen=True)
class ImageInput:
    """One uploaded image, already checked by the API process (format, size, pixel count).

    The bytes are still encoded: decoding happens in the worker, so the API process stays
    light and a corrupt image fails only its own item (see ``InvalidImageError``).
    """

    data: bytes
    format: str
    width: int
    height: int
    top_k: int


class InvalidImageError(ValueError):
    """An image passed the header checks but could not be decoded (truncated, corrupt).

    A worker returns an instance of it in place of that item's result (``execute_batch``)
    or raises it (``execute``); the server answers that request 400, and the other items of
    the batch are unaffected.
    """
