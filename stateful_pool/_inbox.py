"""What callers put in the dispatcher's inbox: a ``Task`` to run, or one of these."""

from __future__ import annotations

from dataclasses import dataclass

from ._slot import WorkerSlot
from ._stream import Stream
from ._task import Task


@dataclass(slots=True)
class StartWorker:
    slot: WorkerSlot


@dataclass(slots=True)
class Cancelled:
    """A queued task its caller cancelled."""

    task: Task


@dataclass(slots=True)
class Close:
    cancel_futures: bool
    timeout: float | None
    kill: bool


@dataclass(slots=True)
class Credit:
    """A stream's reader consumed ``chunks`` chunks."""

    stream: Stream
    chunks: int


@dataclass(slots=True)
class StopStream:
    """A running stream's reader has gone."""

    stream: Stream


@dataclass(slots=True)
class Reclaim:
    """The caller that reads a worker's pipe for ``task`` gives the pipe back."""

    slot: WorkerSlot
    task: Task


Message = Task | StartWorker | Cancelled | Close | Credit | StopStream | Reclaim
