"""``MODELS_FILE``: several models in one server, each with its own pool and placement.

A TOML file with one ``[models.NAME]`` table per model; ``NAME`` is what clients call it by
(``/models/NAME/predict``, ``/v2/models/NAME``, the OpenAI ``model`` field)::

    default = "classifier"                 # served at /predict too (default: the first)

    [models.classifier]
    worker_class = "app.worker:ViTWorker"
    model_name = "vit_large_patch16_224"
    weights = "pretrained"
    devices = ["cuda:0", "cuda:1"]         # one worker per entry; "cpu" once per CPU worker
    max_batch_size = 32

    [models.embedder]
    worker_class = "app.examples.embedder:ImageEmbedder"
    devices = ["cuda:2"]
    settings = { normalize = true }        # the worker's own settings_model
    cpu_threads = 1                        # torch threads of a CPU worker

A model's table takes the per-model server settings (``MODEL_KEYS``, the names of the
environment variables in lower case, ``weights`` for ``MODEL_WEIGHTS``); what it leaves out
comes from the environment, as for a server of one model. ``devices`` places the workers;
without it a model gets ``num_workers`` workers on ``device`` (default: one per GPU). Any
mistake stops the server before a worker is spawned, with the file, the model and the key
named.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stateful_pool import SWorker

from ..settings import Settings

logger = logging.getLogger("app")

# The settings a model's table may set, each as the Settings field it sets.
MODEL_KEYS: dict[str, str] = {
    "worker_class": "worker_class",
    "model_name": "model_name",
    "weights": "model_weights",
    "device": "device",
    "num_workers": "num_workers",
    "precision": "precision",
    "max_batch_size": "max_batch_size",
    "max_batch_wait_ms": "max_batch_wait_ms",
    "queue_size": "queue_size",
    "request_timeout_s": "request_timeout_s",
    "stream_timeout_s": "stream_timeout_s",
    "stream_chunk_timeout_s": "stream_chunk_timeout_s",
    "admission_headroom": "admission_headroom",
    "hang_timeout_s": "hang_timeout_s",
    "restart_backoff_s": "restart_backoff_s",
    "restart_backoff_max_s": "restart_backoff_max_s",
}
OTHER_KEYS = ("devices", "cpu_threads", "settings")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEVICE = re.compile(r"^(cpu|cuda:\d+)$")


class ModelsFileError(ValueError):
    """A models file the server cannot serve; the message names the file, model and key."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the file.

    Attributes:
        name: the served name (the table's key).
        settings: the server's settings with the model's own keys applied.
        devices: one worker per entry, or None: as a server of one model would place them.
        cpu_threads: torch threads of each CPU worker (models sharing the cores split them);
            None: the cores divided by the model's CPU workers.
        worker_settings: the values for the worker's ``settings_model`` (the environment
            supplies the rest).
    """

    name: str
    settings: Settings
    devices: tuple[str, ...] | None = None
    worker_settings: dict[str, Any] | None = None
    cpu_threads: int | None = None


def read_models_file(path: str | Path, base: Settings, gpu_count: int | None = None
                     ) -> tuple[list[ModelEntry], str]:
    """The models of ``path`` and the name of the default one.

    Args:
        base: the server's settings (from the environment), which each model starts from.
        gpu_count: GPUs visible, to check ``devices`` against; None: counted with torch when
            a device names a GPU.

    Raises:
        ModelsFileError: the file is missing or not TOML, a key is unknown or its value
            invalid, a device does not exist; the message names file, model and key.
    """
    where = str(path)
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"MODELS_FILE={where!r} cannot be read: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelsFileError(f"MODELS_FILE={where!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"models", "default"})
    if unknown:
        raise ModelsFileError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; the "
                              "file holds [models.NAME] tables and an optional default")
    tables = document.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ModelsFileError(f"{where}: no [models.NAME] table; declare at least one model")
    entries = [read_entry(where, name, table, base) for name, table in tables.items()]
    default = document.get("default", entries[0].name)
    if not isinstance(default, str) or default not in tables:
        raise ModelsFileError(f"{where}: default = {default!r} is not one of the models "
                              f"({', '.join(tables)})")
    check_devices(where, entries, gpu_count)
    return entries, default


def read_entry(where: str, name: str, table: Any, base: Settings) -> ModelEntry:
    if not NAME.match(name):
        raise ModelsFileError(f"{where}: model name {name!r} must be letters, digits, '_', "
                              "'-' or '.' (it is part of the URL)")
    if not isinstance(table, dict):
        raise ModelsFileError(f"{where}: models.{name} must be a table")
    unknown = sorted(set(table) - set(MODEL_KEYS) - set(OTHER_KEYS))
    if unknown:
        raise ModelsFileError(
            f"{where}: [models.{name}] unknown key(s) {', '.join(unknown)}; a model takes "
            f"{', '.join([*MODEL_KEYS, *OTHER_KEYS])}")
    overrides = {MODEL_KEYS[key]: value for key, value in table.items() if key in MODEL_KEYS}
    try:
        settings = Settings.model_validate({**base.model_dump(), "served_model_name": name,
                                            **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{key_of(error['loc'])}: {error['msg']}" for error in exc.errors())
        raise ModelsFileError(f"{where}: [models.{name}] {problems}") from None
    devices = table.get("devices")
    if devices is not None:
        if (not isinstance(devices, list) or not devices
                or not all(isinstance(d, str) and DEVICE.match(d) for d in devices)):
            raise ModelsFileError(
                f"{where}: [models.{name}] devices = {devices!r}: give a non-empty list of "
                "\"cpu\" and \"cuda:N\" (one worker per entry)")
        for key in ("num_workers", "device"):
            if key in table:
                raise ModelsFileError(f"{where}: [models.{name}] sets both devices and {key}; "
                                      "devices places every worker already")
    threads = table.get("cpu_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ModelsFileError(f"{where}: [models.{name}] cpu_threads = {threads!r}: give a "
                              "whole number of at least 1")
    worker_settings = table.get("settings")
    if worker_settings is not None and not isinstance(worker_settings, dict):
        raise ModelsFileError(f"{where}: [models.{name}] settings must be a table of the "
                              "worker's own settings")
    return ModelEntry(name, settings, None if devices is None else tuple(devices),
                      worker_settings, threads)


def key_of(loc: tuple[Any, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    return next((key for key, target in MODEL_KEYS.items() if target == field), field)


def check_devices(where: str, entries: list[ModelEntry], gpu_count: int | None) -> None:
    """Every GPU named exists; GPUs shared by models are said in the log."""
    wanted = [(entry.name, device) for entry in entries for device in entry.devices or ()
              if device.startswith("cuda")]
    if not wanted:
        return
    if gpu_count is None:
        import torch  # only when the file names a GPU

        gpu_count = torch.cuda.device_count()
    for name, device in wanted:
        if int(device.split(":")[1]) >= gpu_count:
            visible = f"cuda:0 to cuda:{gpu_count - 1}" if gpu_count else "none"
            raise ModelsFileError(f"{where}: [models.{name}] devices: {device} does not exist "
                                  f"(visible GPUs: {visible})")
    users: dict[str, set[str]] = {}
    for name, device in wanted:
        users.setdefault(device, set()).add(name)
    for device, names in sorted(users.items()):
        if len(names) > 1:
            logger.warning("%s is shared by models %s: each loads its own copy of its weights "
                           "there", device, ", ".join(sorted(names)))
    for (name, device), count in Counter(wanted).items():
        if count > 1:
            logger.info("model %s runs %d workers on %s", name, count, device)


def worker_options(worker_cls: type[SWorker[Any, Any]], values: dict[str, Any] | None,
                   where: str) -> Any:
    """The worker's ``settings_model`` from the file's ``settings`` table (the environment
    fills what it leaves out); None when the worker declares none."""
    model = getattr(worker_cls, "settings_model", None)
    if model is None:
        if values:
            raise ModelsFileError(f"{where} {worker_cls.__qualname__} declares no "
                                  "settings_model; remove its settings table")
        return None
    known = set(model.model_fields)
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ModelsFileError(f"{where} settings: unknown key(s) {', '.join(unknown)}; "
                              f"{worker_cls.__qualname__} takes {', '.join(sorted(known))}")
    try:
        return model(**(values or {}))
    except ValidationError as exc:
        problems = "; ".join(f"settings.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise ModelsFileError(f"{where} {problems}") from None
