"""``MODEL_WEIGHTS`` for any model: ``auto``, ``pretrained``, ``random``, a file, a hub id.

The API process only checks the value's shape (``check_weights``); the worker loads them
(``load_timm`` for timm models, ``load_weights`` for any ``torch.nn.Module``) and reports
what it actually loaded, so ``GET /v1/model`` and the logs never hide random weights.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("app.weights")

WEIGHTS_MODES = ("auto", "pretrained", "random")
HUB_ID = re.compile(r"^hf-hub:[\w.-]+/[\w.-]+$")
# How long MODEL_WEIGHTS=auto waits to learn that the model hub is unreachable. Without the
# probe, huggingface_hub retries for about 47 s on this offline machine before giving up.
HUB_PROBE_TIMEOUT_S = 3.0
# What a hub repository holds for a non-timm model, tried in this order.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def check_weights(value: str) -> str:
    """The settings-side check: a mode, a hub id, or an existing file (made absolute)."""
    if value in WEIGHTS_MODES or HUB_ID.match(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"must be one of {', '.join(WEIGHTS_MODES)}, hf-hub:org/name or the path of a "
            f"checkpoint file; {value!r} is none of these")
    return str(path.resolve())


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


def settle_offline_mode(weights: str) -> None:
    """With ``auto`` or ``pretrained`` and an unreachable hub, look in the local cache only:
    weights baked into the image load at once, and missing ones fail at once instead of
    after a minute of retries.

    Call before importing timm or huggingface_hub: they read ``HF_HUB_OFFLINE`` at import.
    """
    if weights in ("auto", "pretrained") and not os.environ.get("HF_HUB_OFFLINE"):
        reason = hub_unreachable_reason()
        if reason:
            os.environ["HF_HUB_OFFLINE"] = "1"
            logger.info("model hub unreachable (%s); looking in the local cache only", reason)


def warn_random(model_name: str, exc: BaseException) -> str:
    logger.warning(
        "could not load pretrained weights for %s (%s: %s); using RANDOM weights, "
        "predictions are meaningless. Set MODEL_WEIGHTS to a checkpoint path, or "
        "MODEL_WEIGHTS=random to silence this.",
        model_name, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    return f"pretrained weights unavailable ({type(exc).__name__})"


def load_timm(model_name: str, weights: str, **kwargs: Any) -> tuple[torch.nn.Module, str, str]:
    """Create a timm model with the requested weights; ``kwargs`` go to ``create_model``.

    Returns:
        ``(model, weights, source)`` where ``weights`` is ``pretrained``, ``random`` or
        ``checkpoint`` (what was actually loaded) and ``source`` says where from or why.
    """
    settle_offline_mode(weights)
    import timm  # after HF_HUB_OFFLINE is settled: huggingface_hub reads it at import

    if HUB_ID.match(weights):
        try:
            model = timm.create_model(weights, pretrained=True, **kwargs)
        except Exception as exc:
            raise OSError(f"cannot load MODEL_WEIGHTS={weights}: {type(exc).__name__}: "
                          f"{exc}") from exc
        return model, "pretrained", weights
    if weights in ("auto", "pretrained"):
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as exc:
            if weights == "pretrained":
                raise
            source = warn_random(model_name, exc)
            return timm.create_model(model_name, pretrained=False, **kwargs), "random", source
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or ""
        return model, "pretrained", f"timm:{model_name}.{tag}".rstrip(".")
    if weights == "random":
        return (timm.create_model(model_name, pretrained=False, **kwargs), "random",
                "random init")
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    timm.models.load_checkpoint(model, weights, strict=True)
    return model, "checkpoint", weights


def load_weights(model_name: str, weights: str, build: Callable[[], torch.nn.Module],
                 pretrained: Callable[[], torch.nn.Module] | None = None,
                 ) -> tuple[torch.nn.Module, str, str]:
    """The same rules for any ``torch.nn.Module``.

    Args:
        model_name: for log lines.
        weights: ``MODEL_WEIGHTS``.
        build: makes the model with random weights.
        pretrained: makes it with its published weights (may download); None when the model
            has none, so ``pretrained`` fails and ``auto`` falls back to random.

    A checkpoint file is a state dict (``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin``
    from ``torch.save``); a hub id names a repository holding one of ``HUB_FILES``.
    """
    if weights in ("auto", "pretrained"):
        try:
            if pretrained is None:
                raise LookupError(f"{model_name} has no published pretrained weights")
            return pretrained(), "pretrained", f"published weights of {model_name}"
        except Exception as exc:
            if weights == "pretrained":
                raise
            return build(), "random", warn_random(model_name, exc)
    if weights == "random":
        return build(), "random", "random init"
    path, source = (hub_file(weights.removeprefix("hf-hub:")), weights) if HUB_ID.match(
        weights) else (weights, weights)
    model = build()
    model.load_state_dict(read_state_dict(path), strict=True)
    return model, "pretrained" if HUB_ID.match(weights) else "checkpoint", source


def hub_file(repo_id: str) -> str:
    """Download (or find in the cache) the weights file of a hub repository."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        for filename in HUB_FILES[:-1]:
            try:
                return str(hf_hub_download(repo_id, filename))
            except EntryNotFoundError:
                continue
        return str(hf_hub_download(repo_id, HUB_FILES[-1]))
    except Exception as exc:
        raise OSError(f"cannot fetch the weights of hf-hub:{repo_id} ({' or '.join(HUB_FILES)})"
                      f": {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def read_state_dict(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often save {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state  # type: ignore[no-any-return]
