"""The restart policy of one worker: a budget of respawns within a sliding window, with an
exponential backoff, and what happens once the budget is spent: give the worker up, or back
off for longer and longer (capped) and try again. Pure: the caller passes the clock, so it is
tested without sleeping."""

from __future__ import annotations

from collections import deque

MAX_RESTART_DELAY = 10.0


class RestartPolicy:
    """At most ``max_restarts`` respawns within any ``window`` seconds (``None``: no limit);
    the n-th respawn in the window waits ``backoff * 2**(n-1)`` seconds, capped at
    ``max_delay``.

    Once the budget is spent, ``crash_loop_backoff=None`` gives the worker up; a number makes
    it wait that long instead, doubling with each further spent budget up to
    ``crash_loop_max_delay``. The doubling starts over once a whole window passes without a
    respawn beyond the budget (the worker has been healthy for a while).
    """

    def __init__(self, max_restarts: int | None, window: float, backoff: float,
                 max_delay: float = MAX_RESTART_DELAY, crash_loop_backoff: float | None = None,
                 crash_loop_max_delay: float = 300.0) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.max_delay = max_delay
        self.crash_loop_backoff = crash_loop_backoff
        self.crash_loop_max_delay = crash_loop_max_delay
        self._times: deque[float] = deque()
        self.total = 0  # respawns over the worker's life
        self._loops = 0  # budgets spent in a row (the crash-loop back-off's exponent)

    def _forget_old(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()

    def recent(self, now: float) -> int:
        """Respawns within the window ending at ``now``."""
        self._forget_old(now)
        return len(self._times)

    def budget_spent(self, now: float) -> bool:
        """Whether the next respawn would exceed ``max_restarts`` within the window."""
        return self.max_restarts is not None and self.recent(now) >= self.max_restarts

    def delay(self, now: float) -> float | None:
        """Seconds to wait before the next respawn, or ``None`` to give the worker up.

        Within the budget: the short exponential backoff. Past it: the crash-loop back-off,
        or ``None`` when there is none.
        """
        recent = self.recent(now)
        if not self.budget_spent(now):
            if recent == 0:
                self._loops = 0  # a whole window without a respawn: the loop is over
            return min(self.backoff * 2.0 ** recent, self.max_delay)
        if self.crash_loop_backoff is None or self.max_restarts == 0:  # 0: never respawn
            return None
        wait = min(self.crash_loop_backoff * 2.0 ** self._loops, self.crash_loop_max_delay)
        self._loops += 1
        return wait

    def record(self, now: float) -> None:
        """A respawn starts now."""
        self._times.append(now)
        self.total += 1
