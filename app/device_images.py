"""Images as tensors on the worker's device: JPEG decoding there, resize/crop/normalise there.

Runs in the worker process. At 1,000-3,000 images/s, one process decoding with Pillow
starves a GPU. On CUDA, JPEGs are decoded by ``torchvision.io.decode_jpeg`` on the GPU
(nvJPEG, a whole batch per call) and resized, cropped and normalised as tensor ops there;
every other image is decoded and resized by Pillow in threads, and only its uint8 pixels
cross to the device (pinned memory, ``non_blocking``), a quarter of the bytes of float32.

``DeviceTransform`` is the model's eval transform (timm's ``Resize -> CenterCrop ->
ToTensor -> Normalize``) split in two halves: the geometric half runs on a PIL image or on a
uint8 tensor, the arithmetic half on the device. A transform it cannot split leaves the worker
on plain Pillow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Pixels decoded on the device per decode_jpeg call: bounds the memory of one call (3 bytes a
# pixel: 256 M pixels = 768 MB of uint8) when a batch holds large photos.
DEVICE_DECODE_PIXEL_BUDGET = 256_000_000
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame, any coding


def jpeg_components(data: bytes) -> int | None:
    """The colour components of a JPEG from its SOF marker (1 grey, 3 YCbCr, 4 CMYK), or None
    when the markers cannot be walked to a frame header."""
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            return data[pos + 9] if pos + 9 < len(data) else None
        if marker == 0xDA or length < 2:  # start of scan before any frame header: broken
            return None
        pos += 2 + length
    return None


def decodable_on_device(data: bytes, fmt: str) -> bool:
    """A JPEG the device decoder should give the same pixels for as Pillow.

    Anything else goes to Pillow, which also owns every error message: MPO (phone cameras)
    and CMYK JPEGs (Pillow and nvJPEG convert CMYK differently); files that do not end with
    the end-of-image marker, since Pillow refuses a truncated JPEG while a decoder that
    forgives one would answer 200 with grey pixels.
    """
    return (fmt == "JPEG" and data[:3] == b"\xff\xd8\xff"
            and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
            and jpeg_components(data) in (1, 3))


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to RGB uint8 CHW tensors on ``device``; None where one failed.

    One batched ``decode_jpeg`` call per pixel budget; if a call fails, its images are
    retried one by one so only the bad one is None (the caller hands it to Pillow, whose
    error message the client then gets).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(group: list[bytes]) -> list[torch.Tensor]:
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in group]
        with warnings.catch_warnings():
            # torchvision >= 0.29 warns on every call that its decoders move to TorchCodec.
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities")
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(out)

    results: list[torch.Tensor | None] = []
    for group in _by_budget(blobs):
        try:
            results.extend(decode(group))
        except RuntimeError:
            for blob in group:
                try:
                    results.extend(decode([blob]))
                except RuntimeError:
                    results.append(None)
    return results


def _by_budget(blobs: Sequence[bytes]) -> list[list[bytes]]:
    """Consecutive groups of JPEGs whose pixels (from a header walk, roughly) fit the budget."""
    groups: list[list[bytes]] = [[]]
    used = 0
    for blob in blobs:
        pixels = _jpeg_pixels(blob)
        if groups[-1] and used + pixels > DEVICE_DECODE_PIXEL_BUDGET:
            groups.append([])
            used = 0
        groups[-1].append(blob)
        used += pixels
    return [g for g in groups if g]


def _jpeg_pixels(data: bytes) -> int:
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return width * height
        if length < 2:
            break
        pos += 2 + length
    return 0


@dataclass(frozen=True)
class DeviceTransform:
    """A model's eval transform, as a geometric half (PIL or uint8 tensor) and a device half.

    Attributes:
        resize: ``Resize``'s size (an int: the shorter side; a pair: height, width).
        interpolation: torchvision's ``InterpolationMode`` of that resize.
        max_size: ``Resize``'s ``max_size``.
        crop: ``CenterCrop``'s (height, width).
        mean, std: ``Normalize``'s, per channel, for pixels scaled to [0, 1].
    """

    resize: int | tuple[int, int]
    interpolation: Any
    max_size: int | None
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Any) -> DeviceTransform | None:
        """Split a torchvision ``Compose`` of exactly ``Resize, CenterCrop, ToTensor (timm's
        MaybeToTensor), Normalize``; None for any other transform."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        names = [type(s).__name__ for s in steps]
        if names[2:3] == ["MaybeToTensor"]:
            names[2] = "ToTensor"
        if names != ["Resize", "CenterCrop", "ToTensor", "Normalize"]:
            return None
        resize, crop, _, normalize = steps
        assert isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)
        if resize.antialias is False:
            return None  # Pillow always antialiases; the tensor half could not match it
        size = resize.size
        return cls(
            resize=size if isinstance(size, int) else (
                size[0] if len(size) == 1 else (int(size[0]), int(size[1]))),
            interpolation=resize.interpolation, max_size=resize.max_size,
            crop=(int(crop.size[0]), int(crop.size[1])),
            mean=tuple(float(v) for v in _as_list(normalize.mean)),
            std=tuple(float(v) for v in _as_list(normalize.std)))

    @property
    def _size(self) -> list[int]:
        return [self.resize] if isinstance(self.resize, int) else list(self.resize)

    def geometry_pil(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop with Pillow, as the eval transform does; uint8 CHW on the CPU."""
        from torchvision.transforms import functional as F

        image = F.center_crop(F.resize(image, self._size, self.interpolation, self.max_size),
                              list(self.crop))
        tensor: torch.Tensor = F.pil_to_tensor(image)
        return tensor

    def geometry_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop uint8 ``(N, 3, H, W)`` images of one size, on their device.

        Two antialiased passes, width then height, each rounded back to uint8: Pillow's own
        order and rounding. One 2-D pass in float differs from Pillow by up to 16 levels on
        noisy images (measured on the test images); two passes by at most 2.
        """
        from torchvision.transforms import functional as F

        height, width = images.shape[-2:]
        new_height, new_width = self.output_size(height, width)
        wide = F.resize(images, [height, new_width], self.interpolation, antialias=True)
        resized = F.resize(wide, [new_height, new_width], self.interpolation, antialias=True)
        cropped: torch.Tensor = F.center_crop(resized, list(self.crop))
        return cropped

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``Resize``'s output size for an image (torchvision's rule: an int sets the shorter
        side, the longer one scaled and truncated, then capped by ``max_size``)."""
        if not isinstance(self.resize, int):
            return self.resize
        short, long = sorted((height, width))
        new_short, new_long = self.resize, int(self.resize * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 ``(N, 3, h, w)`` -> the model's input: ``(x / 255 - mean) / std`` in ``dtype``.

        float32 arithmetic in ToTensor's and Normalize's order, so the Pillow path's input is
        bit-identical to the eval transform's; then cast to the model's dtype.
        """
        import torch

        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return pixels.float().div_(255).sub_(mean).div_(std).to(dtype)


def _as_list(value: Any) -> list[float]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def group_by_shape(tensors: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Positions of tensors of each shape: same-size images are resized in one call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    return groups


def geometry_on_device(transform: DeviceTransform, decoded: Sequence[torch.Tensor]
                       ) -> list[torch.Tensor]:
    """Resize and crop decoded CHW uint8 images, batched by size; one CHW result each."""
    import torch

    out: list[torch.Tensor | None] = [None] * len(decoded)
    for positions in group_by_shape(decoded).values():
        batch = transform.geometry_tensor(torch.stack([decoded[i] for i in positions]))
        for row, index in enumerate(positions):
            out[index] = batch[row]
    return out  # type: ignore[return-value]  # every position is in one group


