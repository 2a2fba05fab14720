"""Request bodies for the load: images generated in memory or read from a folder.

Kept free of locust so the runner (warm-up requests) and the tests can import it.
Bodies are encoded once, before the load starts: on a 2-core machine the load generator
shares the CPU with the server, and re-encoding a multipart body per request would be
measured as server slowness.
"""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes
    content_type: str


def generated_images(count: int, size: tuple[int, int] = (320, 240),
                     seed: int = 0) -> list[Upload]:
    """``count`` distinct JPEGs: a smooth gradient plus noise, about photo-sized when encoded.

    Pure noise would compress badly (3x a photo's bytes), and a flat colour too well; either
    would make decoding cost unlike a real upload's.
    """
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    uploads = []
    for index in range(count):
        base = rng.integers(0, 256, 3)
        gradient = (xs[..., None] * rng.uniform(-1, 1, 3) + ys[..., None] * rng.uniform(-1, 1, 3))
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        uploads.append(Upload(f"generated-{index}.jpg", buffer.getvalue(), "image/jpeg"))
    return uploads


def uni_colour_images(count: int, size: tuple[int, int] = (224, 224),
                      seed: int = 0) -> list[Upload]:
    """``count`` PNGs of one random colour each: the images of the seed's benchmark.

    Cheap to decode, unlike a photo: the load then weighs on the model, not on Pillow.
    """
    from PIL import Image

    rng = random.Random(seed)
    uploads = []
    for index in range(count):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format="PNG")
        uploads.append(Upload(f"uni-colour-{index}.png", buffer.getvalue(), "image/png"))
    return uploads


IMAGE_KINDS = ("photo", "uni-colour")


def load_images(kind: str, size: tuple[int, int], folder: str | Path = "") -> list[Upload]:
    """The uploads of a run: the files of ``folder`` if given, else 16 generated images of
    ``kind`` (``photo``: gradient-and-noise JPEGs; ``uni-colour``: the seed's PNGs)."""
    if folder:
        return folder_images(folder)
    if kind == "uni-colour":
        return uni_colour_images(16, size)
    if kind == "photo":
        return generated_images(16, size)
    raise ValueError(f"image kind must be one of {', '.join(IMAGE_KINDS)}, got {kind!r}")


def parse_size(text: str) -> tuple[int, int]:
    """``(320, 240)`` from ``320x240``."""
    width, sep, height = text.partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) * int(height):
        raise ValueError(f"image size must be WxH like 320x240, got {text!r}")
    return int(width), int(height)


def folder_images(folder: str | Path, limit: int = 64) -> list[Upload]:
    """The first ``limit`` images of a folder (sorted by name), as they are on disk."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [Upload(p.name, p.read_bytes(), _content_type(p.suffix)) for p in paths[:limit]]


def _content_type(suffix: str) -> str:
    kind = suffix.lower().lstrip(".")
    return "image/jpeg" if kind in ("jpg", "jpeg") else f"image/{kind}"


def multipart_body(uploads: Sequence[Upload], field: str = "files") -> tuple[bytes, str]:
    """``(body, content_type)`` of a multipart/form-data POST with one part per upload."""
    boundary = uuid.uuid4().hex
    parts = []
    for upload in uploads:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{upload.filename}"\r\nContent-Type: {upload.content_type}\r\n\r\n'
            .encode() + upload.data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request_bodies(uploads: Sequence[Upload], images_per_request: int,
                   variants: int = 8, seed: int = 0) -> list[tuple[bytes, str]]:
    """A few different bodies of ``images_per_request`` images each, drawn from ``uploads``.

    Several variants, so consecutive requests do not carry byte-identical images (a server
    that cached by content would otherwise look fast).
    """
    if images_per_request < 1:
        raise ValueError(f"images_per_request must be >= 1, got {images_per_request}")
    rng = random.Random(seed)
    return [multipart_body([rng.choice(uploads) for _ in range(images_per_request)])
            for _ in range(variants)]
