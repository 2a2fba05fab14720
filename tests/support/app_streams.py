"""Streaming worker classes for the server tests (``WORKER_CLASS=app_streams:...``).

Module level, so spawned workers import them. Each stream leaves marks in ``$MARK_DIR``, so a
test sees from outside the server what the worker did: ``<name>.steps`` holds how many chunks
the stream's generator (or its ``stream_step``) produced, ``<name>.closed`` appears when its
``finally`` ran (or its ``stream_close`` was called).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from app.contract import InvalidInputError, ModelWorker, WorkerConfig
from stateful_pool import END_OF_STREAM


class TickRequest(BaseModel):
    n: int = Field(5, ge=0, le=100_000)
    step_s: float = Field(0.0, ge=0)
    first_s: float = Field(0.0, ge=0, description="seconds before the first chunk")
    gap_after: int | None = Field(None, description="after this many chunks, wait gap_s")
    gap_s: float = 0.0
    name: str = Field("tick", pattern=r"^[\w-]+$")
    crash_after: int | None = Field(None, description="the worker dies after this many")
    invalid_after: int | None = Field(None, description="InvalidInputError after this many")
    stream: bool = False


class Tick(BaseModel):
    i: int


def mark(name: str, suffix: str, text: str) -> None:
    directory = os.environ.get("MARK_DIR")
    if directory:
        (Path(directory) / f"{name}.{suffix}").write_text(text)


class Ticker(ModelWorker):
    """A generator ``execute``: ``n`` chunks ``{"i": k}``, ``step_s`` apart."""

    default_model = "ticker"
    chunk_model = Tick

    @classmethod
    def to_stream(cls, request: TickRequest) -> dict[str, Any]:
        if request.n == 13:
            raise InvalidInputError("13 ticks bring bad luck")
        return request.model_dump(exclude={"stream"})

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": "cpu", "model": config.model_name,
                "weights": "none"}

    def execute(self, job: dict[str, Any]) -> Iterator[Tick]:
        name = job["name"]
        steps = 0
        try:
            time.sleep(job["first_s"])
            for i in range(job["n"]):
                if i == job["invalid_after"]:
                    raise InvalidInputError(f"tick {i} cannot be written")
                if i == job["crash_after"]:
                    time.sleep(0.2)  # the chunks before reach the server first
                    os._exit(3)
                if i == job["gap_after"]:
                    time.sleep(job["gap_s"])
                if i:
                    time.sleep(job["step_s"])
                steps += 1
                mark(name, "steps", str(steps))
                yield Tick(i=i)
        finally:
            mark(name, "closed", str(steps))


class StepTicker(ModelWorker):
    """The same ticks from ``stream_open`` / ``stream_step`` / ``stream_close``: every open
    stream takes one tick per step (continuous batching)."""

    default_model = "step-ticker"
    chunk_model = Tick

    @classmethod
    def to_stream(cls, request: TickRequest) -> dict[str, Any]:
        return request.model_dump(exclude={"stream"})

    def spawn(self, config: WorkerConfig) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": "cpu", "model": config.model_name,
                "weights": "none"}

    def stream_open(self, job: dict[str, Any]) -> dict[str, Any]:
        if job["invalid_after"] == 0:
            raise InvalidInputError("this stream cannot open")
        return {**job, "i": 0}

    def stream_step(self, states: list[dict[str, Any]]) -> list[Any]:
        time.sleep(max((s["step_s"] for s in states), default=0))
        out: list[Any] = []
        for s in states:
            if s["i"] >= s["n"]:
                out.append(END_OF_STREAM)
                continue
            out.append(Tick(i=s["i"]))
            s["i"] += 1
            mark(s["name"], "steps", str(s["i"]))
        return out

    def stream_close(self, state: dict[str, Any]) -> None:
        mark(state["name"], "closed", str(state["i"]))
