"""Server settings, read from the environment (pydantic-settings).

Every field maps to the upper-case environment variable of the same name (``MODEL_NAME``,
``NUM_WORKERS``...). Invalid values stop the server at start-up with a message naming the
variable, before any worker is spawned.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .images import PILLOW_PIXEL_CEILING
from .weights import WEIGHTS_MODES, check_weights

__all__ = ["CPU_WORKERS", "WEIGHTS_MODES", "Settings", "available_cpus"]


# A request's deadline is at most a day: plenty for HTTP, and a typo of a few zeros is
# refused at start-up rather than holding a client's work for weeks.
MAX_REQUEST_TIMEOUT_S = 86_400.0
# Killing a worker loses its loaded model (a GPU reload can take a minute): by default a
# batch is deemed hung only well past any deadline.
MIN_DEFAULT_HANG_TIMEOUT_S = 60.0


class Settings(BaseSettings):
    """The server's configuration; see README.md, "The server", for the table."""

    # allow_inf_nan=False: "inf" is no way to say "no limit" here; an endless deadline or
    # batch wait would stall the pool, an endless upload limit cannot be counted in bytes.
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    models_file: str | None = Field(
        None, description="a TOML file of several models to serve, each with its own workers "
                          "and devices (docs/MODELS.md); unset: one model, from the settings "
                          "below")
    model_name: str | None = Field(
        None, description="the model the worker loads; unset: the worker's default_model")
    served_model_name: str | None = Field(
        None, pattern=r"^[^/]+$",
        description="the name clients call the model by (the {name} of /v2/models/{name}); "
                    "unset: the last part of MODEL_NAME (org/name and /models/name: name)")
    model_weights: str = Field(
        "auto", description="auto | pretrained | random | hf-hub:org/name | path to a "
                            ".safetensors/.pth file")
    worker_class: str = Field(
        "app.worker:ViTWorker", pattern=r"^[\w.]+:[\w.]+$",
        description="package.module:Class of the SWorker subclass to serve")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    num_workers: int | None = Field(
        None, ge=1, description="workers (default: one per GPU; on CPU see CPU_WORKERS)")
    max_batch_size: int = Field(16, ge=1)
    max_batch_wait_ms: float = Field(0.0, ge=0)
    queue_size: int = Field(256, ge=1)
    request_timeout_s: float = Field(
        60.0, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="each request's deadline, from its arrival; a client may shorten it with "
                    "the X-Request-Timeout header (seconds, at most a day)")
    stream_timeout_s: float = Field(
        600.0, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="the longest a streamed answer (server-sent events) may last, from the "
                    "request's arrival; REQUEST_TIMEOUT_S bounds the wait for its first chunk")
    stream_chunk_timeout_s: float | None = Field(
        None, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="the longest a stream may go without a chunk once it has started (time "
                    "paused for a slow reader does not count); default: REQUEST_TIMEOUT_S")
    admission_headroom: float = Field(
        1.5, ge=0, le=100,
        description="a request is refused at once (503, Retry-After) when its estimated "
                    "finish, times this, falls after its deadline; 0 turns the rule off: every "
                    "request is queued, and one whose deadline passes in the queue gets 504")
    hang_timeout_s: float | None = Field(
        None, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="a batch running longer is deemed hung: its worker is killed and "
                    "respawned (its requests were answered 504 already); default: twice "
                    "REQUEST_TIMEOUT_S, at least 60")
    restart_backoff_s: float = Field(
        5.0, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="once a worker has crashed 5 times within 60 s, it waits this long "
                    "before its next respawn, doubling per further crash loop up to "
                    "RESTART_BACKOFF_MAX_S; it is never given up while the server runs")
    restart_backoff_max_s: float = Field(120.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)
    body_timeout_s: float = Field(
        30.0, gt=0, le=MAX_REQUEST_TIMEOUT_S,
        description="a request body must arrive within this many seconds of the request's "
                    "start, and with no gap between its parts as long: else 408 and the "
                    "connection is closed (stalled uploads hold no socket for long)")
    max_connections: int = Field(
        1000, ge=1, description="open connections and requests at most; past it a request "
                                "is answered 503 at once and its connection closed")
    max_upload_mb: float = Field(20.0, gt=0)
    max_files: int = Field(16, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, le=PILLOW_PIXEL_CEILING)
    api_key: SecretStr | None = None
    api_processes: int = Field(
        1, ge=1, le=256,
        description="uvicorn processes on PORT in front of the same workers; above 1, one "
                    "more process owns the workers and the API processes submit to it "
                    "(docs/SERVER.md, several API processes)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    pool_backend: Literal["process", "ray"] = Field(
        "process", description="process: local worker processes; ray: Ray actors (docs/RAY.md)")
    ray_address: str | None = Field(
        None, description="the Ray cluster to join with POOL_BACKEND=ray (default: a local one)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: readable lines; json: one JSON object per line (server and "
                            "workers)")

    @field_validator("model_weights")
    @classmethod
    def _weights_mode_hub_id_or_existing_file(cls, value: str) -> str:
        return check_weights(value)

    @field_validator("api_key")
    @classmethod
    def _empty_key_means_no_auth(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def hang_timeout(self) -> float:
        """HANG_TIMEOUT_S, or its default: a batch that outlives every deadline by far."""
        if self.hang_timeout_s is not None:
            return self.hang_timeout_s
        return max(MIN_DEFAULT_HANG_TIMEOUT_S, 2 * self.request_timeout_s)

    @property
    def stream_chunk_timeout(self) -> float:
        """STREAM_CHUNK_TIMEOUT_S, or its default: as long as a request may wait."""
        return self.stream_chunk_timeout_s or self.request_timeout_s

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Default number of CPU workers: one, using every core: on two cores it serves a lone image
# faster than two 1-thread workers and holds one copy of the model instead of two, for a few
# percent less throughput at batch 8 (docs/BENCHMARKS.md). NUM_WORKERS overrides it.
CPU_WORKERS = 1
