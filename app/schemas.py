"""Response bodies of the fixed routes; ``predict_response_model`` types a plain ``SWorker``.

A ``ModelWorker`` declares its own answer type (``app.contract``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model


class AnyOutput(BaseModel):
    """Stand-in for a worker that declares no ``output_model``: any JSON object."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    detail: str | list[Any] = Field(description="what went wrong, for a human")


def predict_response_model(output_model: type[BaseModel] | None) -> type[BaseModel]:
    """``{"predictions": [{"filename": ..., **output}, ...]}`` for the given worker output."""
    base = output_model or AnyOutput
    # The filename first, then the worker's fields (inheriting would put it last).
    fields: dict[str, Any] = {
        "filename": (str | None, Field(description="the upload's filename, if it had one"))}
    fields.update({name: (info.annotation, info) for name, info in base.model_fields.items()})
    item = create_model(f"{base.__name__}Prediction", __config__=base.model_config, **fields)
    return create_model(
        "PredictResponse",
        predictions=(list[item],  # a model built at runtime
                     Field(description="one entry per uploaded file, in order")),
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    workers_ready: int
    workers: int
    weights: str = Field(description="what the workers loaded: pretrained, checkpoint, random")
    random_weights: bool = Field(
        description="true when a worker serves RANDOM weights: its answers are meaningless")


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    worker_id: int
    pid: int | None
    state: str
    restarts: int
    tasks_done: int
    host: str | None = Field(None, description="machine name or IP the worker runs on")
    node: str | None = Field(None, description="Ray node id (POOL_BACKEND=ray), else null")
    gpu_ids: list[int] = Field(default_factory=list, description="GPUs Ray gave the worker")


class Batching(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float


class ModelInfo(BaseModel):
    model: str
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
