"""``python -m app``: one uvicorn process serving the app on HOST:PORT (``make serve``).

SIGTERM or Ctrl-C: uvicorn stops accepting, lets the accepted requests finish (at most
SHUTDOWN_TIMEOUT_S), then the lifespan stops the workers; the exit code is 0. It is 1 when
no worker could start, 2 when the settings are invalid.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

import uvicorn
from pydantic import ValidationError

from .logs import configure_logging
from .main import create_app
from .settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid server settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    fatal = False

    def stop_on_fatal() -> None:
        nonlocal fatal
        fatal = True
        server.should_exit = True

    try:
        app = create_app(settings, on_fatal=stop_on_fatal)
    except ValueError as exc:
        print(f"invalid server settings: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s), lifespan="on"))
    # uvicorn re-raises the signal it caught once its shutdown is complete, which would turn
    # a clean drain into exit status -15; by then there is nothing left to interrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if fatal or not server.started else 0


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown, which takes over a second with torch loaded:
    by now the workers are stopped; flush the logs and go."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
