"""The seed benchmark's model: one replica, built and run as the seed built and ran it.

* built by torchvision's ``vit_l_16(weights=None)`` right after ``torch.manual_seed(42)``, so
  every replica of every server holds the same random weights (no download);
* fp32, evaluated under ``torch.no_grad()``;
* each upload decoded by Pillow, then ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``,
  ``Normalize`` with the ImageNet mean and std; the images of a request are one batch;
* one warm-up forward pass of a random 1x3x224x224 tensor when the replica is built.

``MODEL_NAME`` picks the network: ``torchvision:NAME`` (any ``torchvision.models`` name) or
``timm:NAME`` / a bare timm name (``vit_large_patch16_224``, the ViT-L/16 of ``app/``;
``vit_tiny_patch16_224`` in the tests). The preprocessing stays the seed's either way.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "torchvision:vit_l_16"
TORCH_SEED = 42
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIBRARIES = ("torchvision", "timm")


class BadImage(ValueError):  # noqa: N818 (the name says what the client sent)
    """An upload Pillow cannot decode; the servers answer 400 and keep serving."""


def split_model_name(name: str) -> tuple[str, str]:
    """``("torchvision", "vit_l_16")`` from ``torchvision:vit_l_16``; a bare name is timm's."""
    library, colon, model = name.partition(":")
    if not colon:
        return "timm", name
    if library not in LIBRARIES or not model:
        raise ValueError(f"model name must be torchvision:NAME, timm:NAME or a timm name, "
                         f"got {name!r}")
    return library, model


def build_network(name: str) -> torch.nn.Module:
    """The network with the seed's random weights: seeded, then built without a download."""
    import torch

    library, model = split_model_name(name)
    torch.manual_seed(TORCH_SEED)
    if library == "torchvision":
        import torchvision

        built: torch.nn.Module = torchvision.models.get_model(model, weights=None)
        return built
    import timm

    built = timm.create_model(model, pretrained=False)
    return built


def seed_transform() -> Any:
    """The seed's preprocessing of one decoded image into a 3x224x224 tensor."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeedModel:
    """One model replica on one device.

    Args:
        name: see the module docstring.
        device: a torch device string (``cpu``, ``cuda:1``).
        data_parallel: wrap the network in ``torch.nn.DataParallel`` over every visible GPU
            (the ``dp`` server); ignored on CPU, where the plain network runs.
    """

    def __init__(self, name: str, device: str = "cpu", data_parallel: bool = False) -> None:
        import torch

        self.name = name
        self.device = torch.device(device)
        network = build_network(name).eval().to(self.device)
        if data_parallel and self.device.type == "cuda":
            network = torch.nn.DataParallel(network)
        self.network = network
        self.transform = seed_transform()
        with torch.no_grad():
            self.network(torch.randn(1, 3, 224, 224, device=self.device))

    def process(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Classify the images of one request in one batch: ``{"class_id", "score"}`` each.

        Raises:
            BadImage: an image cannot be decoded (the whole request fails, nothing runs).
        """
        import torch
        from PIL import Image

        tensors = []
        for number, data in enumerate(images, 1):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    tensors.append(self.transform(image.convert("RGB")))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise BadImage(f"file {number} is not an image Pillow can decode "
                               f"({type(exc).__name__})") from None
        with torch.no_grad():
            logits = self.network(torch.stack(tensors).to(self.device))
            scores, classes = logits.softmax(dim=-1).max(dim=-1)
        return [{"class_id": c, "score": s}
                for c, s in zip(classes.tolist(), scores.tolist(), strict=True)]
