"""Helpers and worker classes for the app tests (``tests/test_app_*.py``).

Module level, so spawned workers can import the worker classes (pytest puts ``tests/`` on
``sys.path``, and spawned children inherit it).
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from conftest import wait_until  # one helper for every test module
from fastapi.testclient import TestClient
from PIL import Image

from app.contract import ImageInput, WorkerConfig
from app.examples.echo_worker import EchoWorker
from app.main import create_app
from app.settings import Settings

TINY = "vit_tiny_patch16_224"


def settings(**overrides: Any) -> Settings:
    """Test settings: tiny model, random weights, CPU; every field that matters is explicit,
    so a developer's environment variables cannot change what the tests see."""
    values: dict[str, Any] = dict(
        model_name=TINY, model_weights="random", worker_class="app.worker:ViTWorker",
        device="cpu", precision="fp32", num_workers=1, max_batch_size=8,
        max_batch_wait_ms=0, queue_size=64, request_timeout_s=60, max_upload_mb=20,
        max_files=16, max_image_pixels=40_000_000, api_key=None, shutdown_timeout_s=30,
        log_level="info")
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_app(app_settings: Settings, *, wait_ready: bool = True,
                ready_timeout: float = 90) -> Iterator[TestClient]:
    """The app with its real lifespan and worker processes; workers are stopped on exit."""
    with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
        if wait_ready:  # every worker, not just the first: tests count on all of them
            assert wait_until(lambda: all_workers_ready(client), ready_timeout), (
                client.get("/readyz").json())
        yield client


def all_workers_ready(client: TestClient) -> bool:
    body = client.get("/readyz").json()
    return bool(body.get("workers_ready")) and body["workers_ready"] == body["workers"]


# ---- images -------------------------------------------------------------------------------

def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (320, 240), seed: int = 0) -> bytes:
    """A deterministic noisy image (noise keeps random-weight predictions distinct)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG whose header is intact and whose scan data stops half-way."""
    data = image_bytes("JPEG", (320, 240), seed=3)
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries one tiny IDAT: a bomb's header.

    Opening it (header only) is cheap; decoding it would allocate width*height*3 bytes.
    """
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def image_input(data: bytes, top_k: int = 5) -> ImageInput:
    with Image.open(io.BytesIO(data)) as image:
        return ImageInput(data, image.format or "", image.width, image.height, top_k)


def worker_config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = dict(
        worker_index=0, model_name=TINY, weights="random", device="cpu", precision="fp32",
        num_threads=1, max_image_pixels=40_000_000)
    values.update(overrides)
    return WorkerConfig(**values)


# ---- worker classes for WORKER_CLASS=app_fixtures:... -------------------------------------

class SlowEchoWorker(EchoWorker):
    """Takes ``DELAY`` seconds per image: keeps requests in flight long enough to observe."""

    DELAY = 0.5

    def execute(self, item: ImageInput) -> dict[str, Any]:
        time.sleep(self.DELAY)
        return super().execute(item)


class SlowSpawnWorker(EchoWorker):
    """Its model takes a while to load: the server is up but not ready."""

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        time.sleep(3)
        return super().spawn(config)


class BrokenSpawnWorker(EchoWorker):
    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        raise RuntimeError("cannot load the model: out of memory")


# ---- the reference: a direct timm forward, no server --------------------------------------

def save_checkpoint(path: Any) -> None:
    """Random-init tiny ViT weights, as .safetensors or .pth by the file's suffix."""
    import timm
    import torch

    torch.manual_seed(1234)
    state = timm.create_model(TINY, pretrained=False).state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


class Reference:
    """Top-k of a plain timm forward pass of one image with the given checkpoint."""

    def __init__(self, checkpoint: Any) -> None:
        import timm
        import timm.data

        self.model = timm.create_model(TINY, pretrained=False)
        timm.models.load_checkpoint(self.model, str(checkpoint))
        self.model.eval()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**config)
        info = timm.data.ImageNetInfo()
        self.labels = [info.index_to_description(i) for i in range(1000)]

    def top_k(self, data: bytes, k: int = 5) -> list[dict[str, Any]]:
        import torch

        with Image.open(io.BytesIO(data)) as image:
            x = self.transform(image.convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            p, i = self.model(x).softmax(dim=-1)[0].topk(k)
        return [{"class_id": c, "label": self.labels[c], "probability": q}
                for c, q in zip(i.tolist(), p.tolist(), strict=True)]


def assert_same_top_k(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same classes in the same order, same probabilities up to batching's float noise."""
    assert [g["class_id"] for g in got] == [e["class_id"] for e in expected]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert abs(g["probability"] - e["probability"]) < 1e-5, (g, e)
