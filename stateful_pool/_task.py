"""One submitted task, which is also the future handed to its caller."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from . import _messages as m
from ._states import TaskState


class Task(Future[Any]):
    """One submitted task; it is also the future handed to the caller (one object per task).

    ``cancel()`` tells the pool at once, so a cancelled task leaves the queue and frees its
    place in ``queue_size`` without a done-callback on every task.
    """

    def __init__(self, task_id: int, payload: m.Payload, deadline: float | None,
                 holds_slot: bool, on_cancel: Callable[[Task], None],
                 context: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.id = task_id
        self.payload = payload
        self.deadline = deadline
        self.context = context  # travels to the worker with the task (current_contexts())
        self.submitted_at = time.monotonic()
        self.started_at = 0.0
        self.state = TaskState.QUEUED
        self.holds_slot = holds_slot
        self.abandoned = False  # its caller stopped waiting while it ran (asyncio cancel)
        self._on_cancel = on_cancel

    @property
    def wanted(self) -> bool:
        """Whether a caller still waits for this task (not timed out, cancelled, abandoned)."""
        return not (self.abandoned or self.done())

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel(self)
        return cancelled


def settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve a future unless it is already done (a timeout or a cancel got there first)."""
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except InvalidStateError:
        return False
    return True
