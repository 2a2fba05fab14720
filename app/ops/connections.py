"""A bound on open connections, so that idle or stalled clients cannot exhaust the process's
file descriptors: past ``MAX_CONNECTIONS`` a new connection is closed as soon as it is
accepted, and one that sends no request head within ``BODY_TIMEOUT_S`` is closed then; both
are counted.

uvicorn's own ``limit_concurrency`` answers 503 to requests once too many connections are
open, but it accepts every connection first and keeps those that send nothing: a few thousand
silent clients would still hold as many descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("app")

# Descriptors the process needs besides its connections: worker pipes, logs, the listening
# socket, imported libraries' files.
SPARE_FDS = 256


def bounded_http_protocol(limit: int, head_timeout: float, refused: Callable[[], None],
                          silent: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing each connection past ``limit`` open ones
    (``refused``), and a connection that has not sent a whole request head
    ``head_timeout`` seconds after it opened (``silent``)."""

    class BoundedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limit:
                refused()
                transport.close()
                return
            # uvicorn closes a kept-alive connection that stays idle after an answer, but
            # not one that never sends a request: that one would hold its socket for good.
            self._head_timer = self.loop.call_later(head_timeout, self._close_if_silent)

        def _close_if_silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                silent()
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return BoundedHTTPProtocol


def make_room_for(connections: int) -> int:
    """Raise the soft limit on open files towards the hard one so that ``connections`` fit;
    returns the limit in force (a warning if they still do not fit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning("MAX_CONNECTIONS=%d does not fit the open-file limit of %d (ulimit -n): "
                       "lower it, or raise the limit", connections, soft)
    return soft
