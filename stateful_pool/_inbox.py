"""What callers put in the dispatcher's inbox: a ``Task`` to run, or one of these."""

from __future__ import annotations

from dataclasses import dataclass

from ._slot import WorkerSlot
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


Message = Task | StartWorker | Cancelled | Close
