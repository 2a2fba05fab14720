"""A stream without a model: a long job that reports each step as it finishes.

The streaming contract in brief (docs/SERVE_YOUR_MODEL.md). Serve it with::

    WORKER_CLASS=app.examples.progress:Progress make serve
    curl -N -H 'content-type: application/json' -d '{"steps": 5, "stream": true}' \\
        http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field

from app.contract import ModelWorker, WorkerConfig


class Job(BaseModel):
    steps: int = Field(5, ge=1, le=10_000, description="how many steps the job has")
    step_s: float = Field(0.2, ge=0, le=60, description="seconds each step takes")
    stream: bool = Field(False, description="answer with server-sent events, step by step")


class Step(BaseModel):
    step: int = Field(description="the step just finished, from 1")
    of: int
    done: float = Field(description="the fraction of the job done")


class Progress(ModelWorker):
    """Runs a job of a few steps, reporting each one as it finishes."""

    default_model = "progress"
    chunk_model = Step  # it streams: one Step per chunk

    @classmethod
    def to_stream(cls, request: Job) -> Job:
        return request

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": "cpu", "model": "progress", "weights": "none"}

    def execute(self, job: Job) -> Iterator[Step]:
        for n in range(1, job.steps + 1):
            time.sleep(job.step_s)  # the work; a client that leaves stops it at the next yield
            yield Step(step=n, of=job.steps, done=n / job.steps)
