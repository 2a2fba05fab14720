"""The restart policy of one worker: a budget of respawns within a sliding window, with an
exponential backoff. Pure: the caller passes the clock, so it is tested without sleeping."""

from __future__ import annotations

from collections import deque

MAX_RESTART_DELAY = 10.0


class RestartPolicy:
    """At most ``max_restarts`` respawns within any ``window`` seconds (``None``: no limit);
    the n-th respawn in the window waits ``backoff * 2**(n-1)`` seconds, capped at
    ``max_delay``."""

    def __init__(self, max_restarts: int | None, window: float, backoff: float,
                 max_delay: float = MAX_RESTART_DELAY) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.max_delay = max_delay
        self._times: deque[float] = deque()
        self.total = 0  # respawns over the worker's life

    def _forget_old(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()

    def recent(self, now: float) -> int:
        """Respawns within the window ending at ``now``."""
        self._forget_old(now)
        return len(self._times)

    def delay(self, now: float) -> float | None:
        """Seconds to wait before the next respawn, or ``None`` when the budget is spent."""
        recent = self.recent(now)
        if self.max_restarts is not None and recent >= self.max_restarts:
            return None
        return min(self.backoff * 2.0 ** recent, self.max_delay)

    def record(self, now: float) -> None:
        """A respawn starts now."""
        self._times.append(now)
        self.total += 1
