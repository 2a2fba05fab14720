"""What the dispatcher thread sleeps on: every watched fd, and a wakeup pipe for the callers."""

from __future__ import annotations

import os
import select
import weakref
from typing import Any, Generic, TypeVar

O = TypeVar("O")  # noqa: E741 (what owns a watched fd)
# The longest sleep in one poll() call, in ms: poll() takes a C int (about 24.8 days at
# most), and a deadline weeks away must not overflow it. Waking once a day costs nothing.
_MAX_SLEEP_MS = 86_400_000.0


def _close_all(epoll: Any, pipes: Any, *fds: int) -> None:
    if epoll is not None:
        epoll.close()
    if pipes is not None:
        pipes.close()
    for fd in fds:
        os.close(fd)


class Poller(Generic[O]):
    """Waits on the fds of their owners (worker pipes and process sentinels), woken early by
    ``wake()`` from any thread.

    One epoll (or, where there is none, poll) object serves the pool's life: fds are
    (un)registered as workers come and go, instead of a selector being built on every wakeup
    as ``multiprocessing``'s ``wait()`` does. Only the owning thread calls ``watch``,
    ``unwatch``, ``poll`` and ``owner``. With epoll, ``pause`` and ``resume`` may be called
    from any thread and take effect at once, even during a ``poll`` in progress: a paused fd
    is read by someone else for a while (``can_pause`` says whether they are available).

    With epoll the workers' pipes sit in an epoll of their own, nested in the main one: all of
    them can be handed to an event loop at once (``hand_pipes``), which watches that inner
    epoll's fd and reads what ``ready_pipes`` reports, while the owning thread goes on
    watching the processes and its wakeup pipe.
    """

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._woken = False  # a wakeup is already in the pipe: later ones need not write
        epoll = getattr(select, "epoll", None)
        self._epoll = epoll() if epoll is not None else None
        self.can_pause = self._epoll is not None
        self._poll = select.poll() if self._epoll is None else None
        self._register(self._wake_r)
        self._owners: dict[int, O] = {}
        # The workers' pipes (epoll only); its fd is watched by the main epoll, or by an event
        # loop while the pipes are handed to one.
        self._pipes = epoll() if epoll is not None else None
        self.pipes_fd = -1
        self._pipe_fds: set[int] = set()
        if self._pipes is not None:
            self.pipes_fd = self._pipes.fileno()
            self._register(self.pipes_fd)
        # Closed only when nothing can reach this object any more: a caller may still call
        # wake() after the owning thread has ended, and a closed fd number gets reused.
        weakref.finalize(self, _close_all, self._epoll, self._pipes, self._wake_r,
                         self._wake_w).atexit = False

    def _register(self, fd: int) -> None:
        if self._epoll is not None:
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:  # a closed fd's number, reused
                self._epoll.modify(fd, select.EPOLLIN)
        else:
            assert self._poll is not None
            self._poll.register(fd, select.POLLIN)

    def wake(self) -> None:
        """Make the current or next ``poll`` return at once (any thread; cheap when repeated)."""
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (poll returns anyway) or closed (the owner is gone)

    def stop_waking(self) -> None:
        """From now on ``wake()`` writes nothing (the owning thread is done)."""
        self._woken = True

    def watch(self, fd: int, owner: O, pipe: bool = False) -> None:
        """Watch ``fd``; ``pipe``: a worker's pipe (paused, resumed, handed to a loop)."""
        self._owners[fd] = owner
        if pipe and self._pipes is not None:
            self._pipe_fds.add(fd)
            try:
                self._pipes.register(fd, select.EPOLLIN)
            except FileExistsError:  # a closed fd's number, reused
                self._pipes.modify(fd, select.EPOLLIN)
        else:
            self._register(fd)

    def unwatch(self, fd: int) -> None:
        if self._owners.pop(fd, None) is not None:
            try:
                if fd in self._pipe_fds:
                    self._pipe_fds.discard(fd)
                    self._pipes.unregister(fd)  # type: ignore[union-attr]
                elif self._epoll is not None:
                    self._epoll.unregister(fd)
                else:
                    assert self._poll is not None
                    self._poll.unregister(fd)
            except (OSError, KeyError):
                pass  # closed already (epoll forgets a closed fd by itself)

    def pause(self, fd: int) -> None:
        """Stop reporting ``fd`` (epoll only; any thread). A hang-up is still reported once."""
        assert self._pipes is not None
        self._pipes.modify(fd, select.EPOLLONESHOT)

    def resume(self, fd: int) -> None:
        """Report ``fd`` again, at once if it is readable (any thread)."""
        assert self._pipes is not None
        try:
            self._pipes.modify(fd, select.EPOLLIN)
        except OSError:
            pass  # unwatched and closed meanwhile

    def hand_pipes(self, away: bool) -> None:
        """``away``: stop reporting the pipes here (an event loop watches ``pipes_fd`` and
        reads them); else report them here again, at once if one is readable."""
        assert self._epoll is not None
        self._epoll.modify(self.pipes_fd, select.EPOLLONESHOT if away else select.EPOLLIN)

    def ready_pipes(self) -> list[int]:
        """The readable (or hung-up) pipes, now; whoever reads them holds the lock that makes
        it the only reader."""
        assert self._pipes is not None
        return [fd for fd, _ in self._pipes.poll(0)]

    def owner(self, fd: int) -> O | None:
        """Who watches ``fd``; None if it was unwatched since ``poll`` returned it."""
        return self._owners.get(fd)

    def poll(self, timeout: float | None) -> list[int]:
        """Sleep until a watched fd is readable (or closed), ``wake()`` is called, or
        ``timeout`` seconds pass; return the ready watched fds. ``pipes_fd`` stands for
        every pipe: the caller asks ``ready_pipes`` which, once it holds its lock."""
        if self._epoll is not None:
            events = self._epoll.poll(
                -1 if timeout is None else min(timeout, _MAX_SLEEP_MS / 1000.0))
        else:
            assert self._poll is not None
            events = self._poll.poll(
                None if timeout is None else min(timeout * 1000.0, _MAX_SLEEP_MS))
        ready = []
        for fd, _ in events:
            if fd == self._wake_r:
                os.read(self._wake_r, 4096)
                self._woken = False
            else:
                ready.append(fd)
        return ready
