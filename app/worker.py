"""The model: a timm image classifier (default ViT-L/16) in one worker process.

This is the file to copy when serving another model. The contract with the server:

* ``spawn(config: WorkerConfig) -> dict``: load the model once on ``config.device``; the
  returned dict (JSON-able) is shown per worker by ``GET /v1/model``.
* ``execute_batch(items: list[ImageInput]) -> list``: one result per item, in order; a
  result is a dict matching ``output_model``, or an exception *instance* to fail that item
  alone (``InvalidImageError`` becomes a 400 for its request only).
* ``execute(item)``: the same for one item (used when ``MAX_BATCH_SIZE=1``).
* ``output_model``: the pydantic model of one item's result; it types ``POST /predict``
  and its OpenAPI schema.

Point the server at your copy with ``WORKER_CLASS=mypackage.myworker:MyWorker``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import BaseModel, Field

from stateful_pool import SWorker

from .contract import ImageInput, InvalidImageError, WorkerConfig
from .images import configure_decoder, decode_rgb
from .logs import configure_worker_logging

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("app.worker")

# How long MODEL_WEIGHTS=auto waits to learn that the model hub is unreachable. Without the
# probe, huggingface_hub retries for about 47 s on this offline machine before giving up.
HUB_PROBE_TIMEOUT_S = 3.0


class Label(BaseModel):
    class_id: int = Field(description="index of the class in the model's output")
    label: str = Field(description="human-readable class name")
    probability: float = Field(ge=0, le=1)


class Classification(BaseModel):
    top_k: list[Label] = Field(description="the most probable classes, most probable first")


class ViTWorker(SWorker[dict[str, Any], dict[str, Any]]):
    """A timm classifier; batches of uploaded images go through one forward pass."""

    output_model = Classification

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        """Load the model on its device. Runs in the worker process."""
        import torch

        configure_worker_logging(config.worker_index, config.log_level)
        started = time.monotonic()
        # Workers share the machine's cores (preprocessing runs on CPU on GPU workers too):
        # each gets its slice, or they thrash.
        torch.set_num_threads(config.num_threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # torch allows it once per process (loadtest's simple server has replicas)
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[config.precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            logger.warning("PRECISION=%s is for GPUs; using fp32 on CPU", config.precision)
            self.dtype = torch.float32

        configure_decoder()
        # Pillow and torchvision release the GIL while decoding and resizing: a batch's
        # images are prepared in parallel threads, which keeps a GPU fed (one process per GPU).
        self.prepare_pool = (ThreadPoolExecutor(config.num_threads, "prepare")
                             if config.num_threads > 1 else None)
        model, weights, weights_source = load_model(config.model_name, config.weights)
        self.model = model.to(self.device, self.dtype).eval()

        import timm.data

        data_config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.labels = class_names(self.model)
        self.num_classes = len(self.labels)
        # One warm-up forward: the first real request should not pay for lazy initialisation.
        with torch.inference_mode():
            self.model(torch.zeros((1, *data_config["input_size"]), device=self.device,
                                   dtype=self.dtype))
        info = {
            "pid": os.getpid(),
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" else "cpu"),
            "model": config.model_name,
            "weights": weights,
            "weights_source": weights_source,
            "precision": str(self.dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "num_classes": self.num_classes,
            "input_size": list(data_config["input_size"]),
            "load_seconds": round(time.monotonic() - started, 2),
        }
        logger.info("worker %d ready: %s on %s, weights=%s (%s), %.1f s",
                    config.worker_index, config.model_name, info["device"], weights,
                    weights_source, info["load_seconds"])
        return info

    def execute(self, item: ImageInput) -> dict[str, Any]:
        result = self.execute_batch([item])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any] | Exception]:
        """Decode each image, run one forward pass over the good ones. Runs in the worker."""
        import torch

        results: list[dict[str, Any] | Exception | None] = [None] * len(items)
        prepared = (list(self.prepare_pool.map(self.prepare, items))
                    if self.prepare_pool is not None and len(items) > 1
                    else [self.prepare(item) for item in items])
        tensors: list[torch.Tensor] = []
        decoded: list[int] = []
        for index, tensor in enumerate(prepared):
            if isinstance(tensor, InvalidImageError):
                results[index] = tensor  # fails this item only, never its batch neighbours
            else:
                tensors.append(tensor)
                decoded.append(index)
        if tensors:
            k = min(self.num_classes, max(items[i].top_k for i in decoded))
            with torch.inference_mode():
                batch = torch.stack(tensors).to(self.device, self.dtype, non_blocking=True)
                probabilities = self.model(batch).float().softmax(dim=-1)
                top_p, top_i = (t.cpu().tolist() for t in probabilities.topk(k, dim=-1))
            for row, index in enumerate(decoded):
                n = min(k, items[index].top_k)
                results[index] = {"top_k": [
                    {"class_id": c, "label": self.labels[c], "probability": p}
                    for c, p in zip(top_i[row][:n], top_p[row][:n], strict=True)]}
        return results  # type: ignore[return-value]  # every slot is filled above

    def prepare(self, item: ImageInput) -> torch.Tensor | InvalidImageError:
        """Decode and transform one image. Runs in the worker process (maybe in a thread)."""
        try:
            image = decode_rgb(item.data, max_pixels=self.config.max_image_pixels)
        except InvalidImageError as exc:
            return exc
        return self.transform(image)  # type: ignore[no-any-return]


def load_model(model_name: str, weights: str) -> tuple[torch.nn.Module, str, str]:
    """Create the timm model with the requested weights.

    Returns:
        ``(model, weights, source)`` where ``weights`` is ``pretrained``, ``random`` or
        ``checkpoint`` (what was actually loaded) and ``source`` says where from or why.
    """
    if weights == "auto" and not os.environ.get("HF_HUB_OFFLINE"):
        reason = hub_unreachable_reason()
        if reason:
            # Still try timm's local cache: offline mode makes a cache miss fail at once.
            os.environ["HF_HUB_OFFLINE"] = "1"
            logger.info("model hub unreachable (%s); looking in the local cache only", reason)
    import timm  # after HF_HUB_OFFLINE is settled: huggingface_hub reads it at import

    if weights in ("auto", "pretrained"):
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as exc:
            if weights == "pretrained":
                raise
            logger.warning(
                "could not load pretrained weights for %s (%s: %s); using RANDOM weights, "
                "predictions are meaningless. Set MODEL_WEIGHTS to a checkpoint path, or "
                "MODEL_WEIGHTS=random to silence this.",
                model_name, type(exc).__name__, str(exc).splitlines()[0][:200])
            return (timm.create_model(model_name, pretrained=False), "random",
                    f"pretrained weights unavailable ({type(exc).__name__})")
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or ""
        return model, "pretrained", f"timm:{model_name}.{tag}".rstrip(".")
    if weights == "random":
        return timm.create_model(model_name, pretrained=False), "random", "random init"
    model = timm.create_model(model_name, pretrained=False)
    timm.models.load_checkpoint(model, weights, strict=True)
    return model, "checkpoint", weights


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None if a TCP connect succeeds."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # only the proxy knows; let the download try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc}"


def class_names(model: torch.nn.Module) -> list[str]:
    """Readable names of the model's classes (ImageNet names ship inside timm)."""
    import timm.data

    num_classes: int = model.num_classes  # type: ignore[assignment]
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]
