"""Cheap checks of an upload in the API process, before anything reaches the pool.

Only the header is read here (``Image.open`` is lazy): the format, the size and the pixel
count are known without decoding a single pixel, so a decompression bomb is refused before
it can cost memory, and a file that is not an allowed image never occupies a worker.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Pillow format ids. The JPEG opener also accepts MPO (phone cameras: a JPEG with extra
# frames) and reports it as "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# Magic bytes of the allowed formats: bytes that start like one but that Pillow cannot open
# are a corrupt image (400), not a foreign format (415).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
# Pillow warns above this and raises at twice it; inspect_image refuses both, so this is the
# highest MAX_IMAGE_PIXELS that can take effect (about 89.5 M pixels).
PILLOW_PIXEL_CEILING = Image.MAX_IMAGE_PIXELS


class ImageRejected(Exception):
    """The upload is refused; carries the HTTP status and the client-facing message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, *, max_pixels: int, name: str = "image") -> ImageHeader:
    """Read the header of an encoded image and apply the format and pixel limits.

    Raises:
        ImageRejected: 400 for an empty file, 415 for bytes that are not an image of an
            allowed format, 413 for an image with more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageRejected(400, f"{name}: the file is empty")
    try:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; the warning is made an
        # error here so that range is refused too, with the same 413. catch_warnings is not
        # thread-safe, which is fine: this runs on the event loop thread only.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                header = ImageHeader(image.format or "", image.width, image.height)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(
            413, f"{name}: the image has too many pixels (limit {max_pixels})") from None
    except UnidentifiedImageError:
        if looks_like_allowed_format(data):
            raise ImageRejected(400, f"{name}: corrupt image header") from None
        raise ImageRejected(
            415, f"{name}: not an image in an accepted format "
            f"({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # A recognised format whose header is broken (Pillow raises SyntaxError for some).
        raise ImageRejected(400, f"{name}: corrupt image header ({exc})") from None
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageRejected(
            413, f"{name}: the image has {header.width}x{header.height} = {pixels} pixels, "
            f"over the limit of {max_pixels}")
    if pixels == 0:
        raise ImageRejected(400, f"{name}: the image has no pixels")
    return header


def looks_like_allowed_format(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def configure_decoder() -> None:
    """Make Pillow's DecompressionBombWarning an error in this process.

    Runs in the worker process, once: a process-wide filter, because ``catch_warnings``
    around each decode would not be thread-safe and workers decode in threads.
    """
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_rgb(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an image fully to RGB (the first frame of an animation).

    Runs in the worker process (after ``configure_decoder``).

    Raises:
        InvalidImageError: the image is truncated, corrupt or over the pixel limit.
    """
    from .contract import InvalidImageError

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise InvalidImageError(f"image over the pixel limit of {max_pixels}")
            return image.convert("RGB")
    except InvalidImageError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise InvalidImageError(f"cannot decode the image: {exc}") from None
