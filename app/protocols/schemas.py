"""Response bodies of the server's own routes, and ``/predict``'s error body.

The inference answers are typed by the worker's own declaration (``app.contract``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    detail: str | list[Any] = Field(description="what went wrong, for a human")


class Health(BaseModel):
    status: str


class ModelReadiness(BaseModel):
    ready: bool = Field(description="a worker of this model can take a task now")
    workers_ready: int
    workers: int
    reason: str | None = Field(None, description="when not ready or degraded: why")


class Readiness(BaseModel):
    status: str = Field(description="ready, or degraded while fewer workers serve than "
                                    "planned (the server still takes requests)")
    reason: str | None = Field(None, description="when degraded: which workers are down, "
                                                 "why, and when each is tried again")
    workers_ready: int
    workers: int
    weights: str = Field(description="what the workers loaded: pretrained, checkpoint, random")
    random_weights: bool = Field(
        description="true when a worker serves RANDOM weights: its answers are meaningless")
    models: dict[str, ModelReadiness] | None = Field(
        None, description="with several models: each one's readiness, by served name")


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    worker_id: int | None = Field(description="null for a planned worker that failed to "
                                              "start (worker_index names it)")
    pid: int | None
    state: str = Field(description="starting, idle, busy, restarting, backing_off (after a "
                                   "crash loop), stopping, stopped, dead or failed_to_start")
    restarts: int
    tasks_done: int
    restart_in_s: float | None = Field(
        None, description="seconds until its next start attempt, while it is down")
    last_failure: str | None = Field(None, description="why its last process failed")
    host: str | None = Field(None, description="machine name or IP the worker runs on")
    node: str | None = Field(None, description="Ray node id (POOL_BACKEND=ray), else null")
    gpu_ids: list[int] = Field(default_factory=list, description="GPUs Ray gave the worker")


class Batching(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float


class ModelInfo(BaseModel):
    model: str = Field(description="MODEL_NAME: what the workers load")
    ready: bool = Field(False, description="a worker can take a task now")
    workers_ready: int = 0
    workers_planned: int = 0
    served_model_name: str = Field(
        description="SERVED_MODEL_NAME: what clients call it (the v2 routes' model name)")
    weights: str = Field(description="MODEL_WEIGHTS as configured; per worker: what loaded")
    random_weights: bool = Field(
        False, description="true when a worker serves RANDOM weights (meaningless answers)")
    worker_class: str
    worker_settings: dict[str, Any] | None = Field(
        None, description="the worker's own settings (its settings_model), if it has any")
    backend: str = Field(description="POOL_BACKEND: process or ray")
    device: str
    precision: str
    batching: Batching
    queue_size: int
    request_timeout_s: float
    workers: list[WorkerInfo]
