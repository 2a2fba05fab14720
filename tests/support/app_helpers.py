"""Helpers and worker classes for the app tests (``tests/test_app_*.py``).

Module level, so spawned workers can import the worker classes (pytest puts ``tests/`` on
``sys.path``, and spawned children inherit it).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from procs import wait_until  # one helper for every test module
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.contract import ImageFile, ImageInput, InvalidInputError, ModelWorker, WorkerConfig
from app.examples.echo_worker import EchoWorker
from app.main import create_app
from app.settings import Settings
from loadtest.servers import free_port

TINY = "vit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parents[2]
# Environment variables a developer may have set that would change what a served test sees.
FOREIGN_ENV = ("HF_", "MODEL_", "WORKER_CLASS", "EMBEDDER_", "DETECTOR_", "TEXT_")


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


# ---- a real server: ``python -m app`` on a 127.0.0.1 socket, as ``make serve`` runs it ----

@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Start ``python -m app`` like ``make serve``; always stopped (and its group) on exit.

    Yields ``(process, base_url, log_path)``. ``env`` overrides the defaults: the tiny ViT
    on CPU, every other variable from a clean environment.
    """
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    full_env.update({"HOST": "127.0.0.1", "PORT": str(port), "MODEL_NAME": TINY,
                     "DEVICE": "cpu", "PYTHONPATH": str(ROOT / "tests" / "support"), **env})
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=full_env,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def http_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=60, trust_env=False)


def wait_ready(http: httpx.Client, process: subprocess.Popen[bytes], log: Path,
               timeout: float = 120) -> None:
    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(ready, timeout, interval=0.2), log.read_text()


@contextmanager
def served(tmp_path: Path, worker_class: str, **env: str) -> Iterator[httpx.Client]:
    """Any worker class behind the real server, ready; an httpx client on its socket."""
    with serve(tmp_path, WORKER_CLASS=worker_class, **env) as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        yield http


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


# ---- worker classes for WORKER_CLASS=app_helpers:... -------------------------------------

class SlowEchoWorker(EchoWorker):
    """Takes ``DELAY`` seconds per image: keeps requests in flight long enough to observe."""

    DELAY = 0.5

    def execute(self, item: ImageInput) -> dict[str, Any]:
        time.sleep(self.DELAY)
        return super().execute(item)


class SlowerEchoWorker(SlowEchoWorker):
    DELAY = 2.0


class QuarterEchoWorker(SlowEchoWorker):
    DELAY = 0.25


class PoisonEchoWorker(EchoWorker):
    """Dies (exit code 3) on an image 13 pixels wide: an input that kills the model."""

    def execute(self, item: ImageInput) -> dict[str, Any]:
        if item.width == 13:
            os._exit(3)
        return super().execute(item)


class HangingEchoWorker(EchoWorker):
    """Never returns from an image 13 pixels wide (a deadlock in a user's model)."""

    def execute(self, item: ImageInput) -> dict[str, Any]:
        while item.width == 13:
            time.sleep(0.05)
        return super().execute(item)


class WidthDelayEchoWorker(EchoWorker):
    """Takes one second per 100 pixels of an image's width: each request picks its own time."""

    def execute(self, item: ImageInput) -> dict[str, Any]:
        time.sleep(item.width / 100)
        return super().execute(item)


class RecordingSlowWorker(SlowEchoWorker):
    """A ``SlowEchoWorker`` that appends the sha256 of each image it starts to the file named
    by ``$RECORD_FILE``: what reached a worker, seen from outside the server."""

    def execute(self, item: ImageInput) -> dict[str, Any]:
        with open(os.environ["RECORD_FILE"], "a") as record:
            record.write(hashlib.sha256(item.data).hexdigest() + "\n")
        return super().execute(item)


class SlowSpawnWorker(EchoWorker):
    """Its model takes a while to load: the server is up but not ready."""

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        time.sleep(3)
        return super().spawn(config)


class StuckSpawnWorker(EchoWorker):
    """Its model takes a minute to load: a server stopped while it loads must not wait."""

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        time.sleep(60)
        return super().spawn(config)


class LoggingEchoWorker(EchoWorker):
    """Writes a log line for each batch it runs: shows the request ids the worker sees."""

    def execute_batch(self, items: list[ImageInput]) -> list[dict[str, Any]]:
        logging.getLogger("app_helpers.worker").info("echoing %d item(s)", len(items))
        return super().execute_batch(items)


class PairRequest(BaseModel):
    """An upload field named ``request``, an optional second one, a query parameter under an
    alias, and a check across fields: what a user's request type may hold."""

    request: ImageFile
    second: ImageFile | None = None
    min_side: int = Field(1, alias="minSide")

    @model_validator(mode="after")
    def _same_width(self) -> PairRequest:
        if self.second is not None and self.second.width != self.request.width:
            raise ValueError("both images must have the same width")
        return self


class PairAnswer(BaseModel):
    widths: list[int]
    min_side: int


class PairWorker(ModelWorker):
    @classmethod
    def to_items(cls, request: PairRequest) -> list[ImageFile]:
        return [request.request] + ([request.second] if request.second else [])

    @classmethod
    def to_answer(cls, request: PairRequest, results: list[int]) -> PairAnswer:
        return PairAnswer(widths=results, min_side=request.min_side)

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"model": config.model_name}

    def execute_batch(self, items: list[ImageFile]) -> list[Any]:
        return [item.width for item in items]


class LengthRequest(BaseModel):
    texts: list[str]


class LengthOneByOne(ModelWorker):
    """Defines ``execute`` (one item) and no ``execute_batch``."""

    @classmethod
    def to_items(cls, request: LengthRequest) -> list[str]:
        return request.texts

    @classmethod
    def to_answer(cls, request: LengthRequest, results: list[int]) -> list[int]:
        return results

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"model": config.model_name}

    def execute(self, item: str) -> int:
        if not item:
            raise InvalidInputError("an empty text has no length worth computing")
        return len(item)


class LoadedRequest(BaseModel):
    texts: list[str]


class LoadedAnswer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    weights: str
    texts: list[str]


class LoadedNameWorker(ModelWorker):
    """Answers which model name and weights its worker loaded: shows which workers served a
    request across a reload. Its spawn takes ``SPAWN_S`` (a warm-up); a model name starting
    with ``broken`` cannot load; each text takes 5 ms."""

    SPAWN_S = 0.5

    @classmethod
    def to_items(cls, request: LoadedRequest) -> list[str]:
        return request.texts

    @classmethod
    def to_answer(cls, request: LoadedRequest, results: list[tuple[str, str, str]]
                  ) -> LoadedAnswer:
        names = {(name, weights) for name, weights, _ in results}
        assert len(names) == 1, names  # one request's items are served by one model
        [(name, weights)] = names
        return LoadedAnswer(model_name=name, weights=weights, texts=[t for *_, t in results])

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        time.sleep(self.SPAWN_S)
        if config.model_name.startswith("broken"):
            raise RuntimeError(f"cannot load {config.model_name}: out of memory")
        self.loaded = (config.model_name, config.weights)
        return {"pid": os.getpid(), "model": config.model_name, "weights": config.weights}

    def execute_batch(self, items: list[str]) -> list[tuple[str, str, str]]:
        time.sleep(0.005 * len(items))
        return [(*self.loaded, item.upper()) for item in items]


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


# ---- the example workers' references: the model called directly, no server ---------------

def save_embedder_checkpoint(path: Any) -> None:
    """Random-init tiny ViT backbone (``num_classes=0``), as the embedder builds it."""
    import timm
    import torch

    torch.manual_seed(4321)
    torch.save(timm.create_model(TINY, pretrained=False, num_classes=0).state_dict(), path)


class EmbedderReference:
    def __init__(self, checkpoint: Any) -> None:
        import timm
        import timm.data

        self.model = timm.create_model(TINY, pretrained=False, num_classes=0)
        timm.models.load_checkpoint(self.model, str(checkpoint))
        self.model.eval()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.transform = timm.data.create_transform(**config)

    def embed(self, data: bytes, normalize: bool = True) -> list[float]:
        import torch

        with Image.open(io.BytesIO(data)) as image:
            x = self.transform(image.convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            features = self.model(x)
            if normalize:
                features = torch.nn.functional.normalize(features, dim=-1)
        return features[0].tolist()  # type: ignore[no-any-return]


DETECTOR = "ssdlite320_mobilenet_v3_large"


def save_detector_checkpoint(path: Any) -> None:
    """SSDLite with random weights whose batch-norm statistics are measured on noise images.

    Plain random init gives every box the same score (1/91): the backbone's activations
    vanish under the default running statistics. Measured statistics spread the scores, so
    comparing the server with the model says something.
    """
    import torch
    from torchvision.models import get_model

    torch.manual_seed(99)
    model = get_model(DETECTOR, weights=None, weights_backbone=None, num_classes=91)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration batches
            module.reset_running_stats()
    model.backbone.train()
    with torch.no_grad():
        for _ in range(3):
            model.backbone(torch.rand(4, 3, 320, 320))
    torch.save(model.state_dict(), path)


class DetectorReference:
    def __init__(self, checkpoint: Any) -> None:
        import torch
        from torchvision.models import get_model

        self.model = get_model(DETECTOR, weights=None, weights_backbone=None, num_classes=91)
        self.model.load_state_dict(torch.load(checkpoint, weights_only=True))
        self.model.eval()

    def detect(self, data: bytes) -> dict[str, list[Any]]:
        """Every box of one image (torchvision's own floor of 0.001), best first."""
        import torch
        from torchvision.transforms.functional import to_tensor

        with Image.open(io.BytesIO(data)) as image:
            x = to_tensor(image.convert("RGB"))
        with torch.inference_mode():
            [out] = self.model([x])
        return {k: v.tolist() for k, v in out.items()}


def threshold_in_a_gap(scores: list[float], top: int = 12) -> float:
    """A score threshold midway in the widest gap among the best ``top`` scores, so float
    noise between a batched and a single forward cannot move a box across it."""
    best = sorted(scores, reverse=True)[:top]
    gaps = [(best[i] - best[i + 1], i) for i in range(len(best) - 1)]
    _, i = max(gaps)
    return (best[i] + best[i + 1]) / 2


def save_text_checkpoint(path: Any) -> None:
    """Random-init ByteTransformer with a head scaled up, so probabilities are far from 1/2."""
    import torch

    from app.examples.text import TextSettings, build_model

    torch.manual_seed(7)
    model = build_model(TextSettings())
    with torch.no_grad():
        model.head.weight.mul_(20)
    torch.save(model.state_dict(), path)


class TextReference:
    def __init__(self, checkpoint: Any) -> None:
        import torch

        from app.examples.text import TextSettings, build_model

        self.settings = TextSettings()
        self.model = build_model(self.settings)
        self.model.load_state_dict(torch.load(checkpoint, weights_only=True))
        self.model.eval()

    def classify(self, text: str) -> dict[str, Any]:
        import torch

        from app.examples.text import encode

        with torch.inference_mode():
            p = self.model(encode([text], self.settings.max_bytes)).softmax(-1)[0]
        c = int(p.argmax())
        return {"label": self.settings.label_names[c], "class_id": c,
                "probability": float(p[c])}


# ---- a request built from nothing but the server's /openapi.json ---------------------------

def sample_value(schema: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A valid JSON value for a (small) JSON schema: defaults, minimums, two list items."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "default" in schema:
        return schema["default"]
    if "anyOf" in schema:
        return sample_value(schema["anyOf"][0], spec)
    kind = schema.get("type")
    if kind == "object":
        return {name: sample_value(sub, spec) for name, sub in schema["properties"].items()
                if name in schema.get("required", [])}
    if kind == "array":
        return [sample_value(schema["items"], spec)
                for _ in range(max(2, schema.get("minItems", 0)))]
    if kind == "string":
        return "a sample text, é and 中 included"
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    raise AssertionError(f"no sample for {schema}")


def request_from_openapi(spec: dict[str, Any], path: str = "/predict") -> tuple[
        dict[str, Any], int]:
    """httpx keywords for a valid ``POST path`` built from the spec, and how many input items
    it carries (files, or the JSON body's list items)."""
    operation = spec["paths"][path]["post"]
    content = operation["requestBody"]["content"]
    params = {p["name"]: sample_value(p["schema"], spec)
              for p in operation.get("parameters", []) if p.get("required")}
    if "application/json" in content:
        body = sample_value(content["application/json"]["schema"], spec)
        lists = [v for v in body.values() if isinstance(v, list)] if isinstance(body, dict) \
            else [body]
        return {"json": body, "params": params}, len(lists[0])
    form = content["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    files = []
    for name, field in form["properties"].items():
        many = field.get("type") == "array"
        for n in range(2 if many else 1):
            files.append((name, (f"{name}{n}.png", image_bytes("PNG", (64 + 16 * n, 48), n),
                                 "image/png")))
    return {"files": files, "params": params}, len(files)


class FlakySpawnWorker(EchoWorker):
    """Worker 1's first start fails (as on a GPU short of memory); later starts succeed.
    The file named by ``FLAKY_SPAWN_MARKER`` remembers the failure across processes."""

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        marker = Path(os.environ["FLAKY_SPAWN_MARKER"])
        if config.worker_index == 1 and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().spawn(config)
