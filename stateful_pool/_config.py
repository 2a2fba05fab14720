"""The pool's options, checked once, in the caller, before anything is spawned."""

from __future__ import annotations

from dataclasses import dataclass


def check_timeout(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be None or > 0 seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """``SPool``'s tuning options (documented there). ``ValueError`` for any out of range."""

    queue_size: int | None = None
    submission_timeout: float | None = None
    execution_timeout: float | None = None
    max_batch_size: int = 1
    max_batch_wait: float = 0.0
    spawn_timeout: float | None = None
    hang_timeout: float | None = None
    max_restarts: int | None = 5
    prefetch: int = 0
    restart_window: float = 60.0
    restart_backoff: float = 0.1
    abort_grace: float = 1.0
    crash_loop_backoff: float | None = None
    crash_loop_max_delay: float = 300.0
    first_chunk_timeout: float | None = None
    chunk_timeout: float | None = None
    stream_buffer: int = 64

    def __post_init__(self) -> None:
        if self.queue_size is not None and self.queue_size < 0:
            raise ValueError(f"queue_size must be None or >= 0, got {self.queue_size}")
        if self.submission_timeout is not None and self.submission_timeout < 0:
            raise ValueError("submission_timeout must be None or >= 0, got "
                             f"{self.submission_timeout}")
        check_timeout("execution_timeout", self.execution_timeout)
        check_timeout("spawn_timeout", self.spawn_timeout)
        check_timeout("hang_timeout", self.hang_timeout)
        check_timeout("crash_loop_backoff", self.crash_loop_backoff)
        check_timeout("first_chunk_timeout", self.first_chunk_timeout)
        check_timeout("chunk_timeout", self.chunk_timeout)
        at_least = {"max_batch_size": (self.max_batch_size, 1, ""),
                    "max_batch_wait": (self.max_batch_wait, 0, " seconds"),
                    "prefetch": (self.prefetch, 0, ""),
                    "stream_buffer": (self.stream_buffer, 1, " chunks"),
                    "restart_backoff": (self.restart_backoff, 0, " seconds"),
                    "abort_grace": (self.abort_grace, 0, " seconds")}
        for name, (value, least, unit) in at_least.items():
            if value < least:
                raise ValueError(f"{name} must be >= {least}{unit}, got {value}")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise ValueError(f"max_restarts must be None or >= 0, got {self.max_restarts}")
        if not self.crash_loop_max_delay > 0:
            raise ValueError("crash_loop_max_delay must be > 0 seconds, got "
                             f"{self.crash_loop_max_delay!r}")
        if self.restart_window <= 0:
            raise ValueError(f"restart_window must be > 0 seconds, got {self.restart_window}")
