"""Which worker class, how many workers, where: computed once per server.

``make_plan`` imports nothing heavy: it counts GPUs with torch only when ``DEVICE`` allows
one, and joins Ray only with ``POOL_BACKEND=ray`` (once: the plan carries the Ray options
the pool needs).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from stateful_pool import SWorker

from ..contract import WorkerConfig
from ..settings import CPU_WORKERS, Settings, available_cpus


@dataclass(frozen=True)
class WorkerPlan:
    """The workers to spawn and the ``SPool`` keywords that choose where they run.

    Attributes:
        model_name: ``MODEL_NAME``, or the worker class's ``default_model``.
        served_name: ``SERVED_MODEL_NAME``, or ``served_name_for(model_name)``.
        options: the worker's own settings (``settings_model``), or None.
    """

    configs: list[WorkerConfig]
    model_name: str
    options: Any = None
    pool_options: dict[str, Any] = field(default_factory=dict)
    served_name: str = ""

    def __post_init__(self) -> None:
        if not self.served_name:
            object.__setattr__(self, "served_name", served_name_for(self.model_name))


def load_worker_class(spec: str) -> type[SWorker[Any, Any]]:
    """Import ``package.module:Class`` and check it is an ``SWorker``."""
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"WORKER_CLASS={spec!r} cannot be imported: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, SWorker)):
        raise ValueError(f"WORKER_CLASS={spec!r} is not a subclass of stateful_pool.SWorker")
    return obj


def worker_options(worker_cls: type[SWorker[Any, Any]]) -> Any:
    """The worker's own settings read from the environment (None if it declares none).

    Raises:
        ValueError: a value in the environment is invalid; the message names it.
    """
    model = getattr(worker_cls, "settings_model", None)
    if model is None:
        return None
    try:
        return model()
    except ValidationError as exc:
        prefix = model.model_config.get("env_prefix", "")
        raise ValueError(f"invalid {worker_cls.__qualname__} settings (environment variables "
                         f"{prefix.upper()}*):\n{exc}") from None


def model_name_for(settings: Settings, worker_cls: type[SWorker[Any, Any]]) -> str:
    return (settings.model_name or getattr(worker_cls, "default_model", None)
            or worker_cls.__qualname__)


def served_name_for(model_name: str) -> str:
    """The name clients call a model by when ``SERVED_MODEL_NAME`` is unset: the last part
    of a hub id or a path (``org/name`` and ``/models/name`` are ``name``), else the name."""
    last = model_name.rstrip("/").rsplit("/", 1)[-1]
    return last or model_name


def make_plan(settings: Settings, worker_cls: type[SWorker[Any, Any]] | None = None, *,
              devices: Sequence[str] | None = None, options: Any = None,
              cpu_threads: int | None = None) -> WorkerPlan:
    """One worker per visible GPU (or NUM_WORKERS, round-robin over the GPUs); without a
    GPU, CPU workers that split the cores between them. With POOL_BACKEND=ray, one worker per
    GPU of the whole Ray cluster (see app/serving/cluster.py).

    Args:
        devices: one worker per entry (a models file's ``devices``); CPU workers split the
            cores between them.
        options: the worker's own settings, when given (a models file's ``settings``); else
            read from the environment.
        cpu_threads: torch threads per CPU worker (a models file's ``cpu_threads``); default:
            the cores divided between the workers.

    Raises:
        ValueError: ``WORKER_CLASS`` cannot be imported, its settings are invalid, or
            ``DEVICE=cuda`` without a GPU.
    """
    worker_cls = worker_cls or load_worker_class(settings.worker_class)
    if options is None:
        options = worker_options(worker_cls)
    model_name = model_name_for(settings, worker_cls)
    pool_options: dict[str, Any] = {}
    if devices is not None:
        if settings.pool_backend == "ray":
            raise ValueError("devices place workers on this machine; with POOL_BACKEND=ray "
                             "Ray places them (leave devices out)")
        devices = list(devices)
        threads = max(1, available_cpus() // max(1, devices.count("cpu") or 1))
    elif settings.pool_backend == "ray":
        from . import cluster

        resources = cluster.connect(settings.ray_address)
        count, on_gpu, ray_options = cluster.plan(resources, device=settings.device,
                                                  num_workers=settings.num_workers)
        # Ray narrows CUDA_VISIBLE_DEVICES per actor: its GPU is always cuda:0.
        devices = ["cuda:0" if on_gpu else "cpu"] * count
        threads = int(ray_options.get("num_cpus", 1))
        pool_options = {"backend": "ray", "worker_options": ray_options}
    else:
        gpus = 0
        if settings.device in ("auto", "cuda"):
            import torch  # only to count GPUs: DEVICE=cpu serves without importing it here

            gpus = torch.cuda.device_count()
            if settings.device == "cuda" and gpus == 0:
                raise ValueError("DEVICE=cuda but no CUDA device is visible")
        cpus = available_cpus()
        count = settings.num_workers or gpus or CPU_WORKERS
        devices = [f"cuda:{index % gpus}" if gpus else "cpu" for index in range(count)]
        threads = max(1, cpus // count)
    if cpu_threads is not None:
        threads = cpu_threads
    configs = [
        WorkerConfig(
            worker_index=index,
            model_name=model_name,
            weights=settings.model_weights,
            device=device,
            precision=settings.precision,
            num_threads=threads,
            max_image_pixels=settings.max_image_pixels,
            log_level=settings.log_level,
            options=options,
            max_batch_size=settings.max_batch_size,
        )
        for index, device in enumerate(devices)
    ]
    return WorkerPlan(configs, model_name, options, pool_options,
                      settings.served_model_name or served_name_for(model_name))


def plan_workers(settings: Settings) -> list[WorkerConfig]:
    """The worker configs of ``make_plan`` (for the load-test servers and benchmarks)."""
    return make_plan(settings).configs
