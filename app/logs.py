"""Log format for the API process and the worker processes."""

from __future__ import annotations

import contextvars
import logging
import sys

API_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``%(request_id)s`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    """One stderr handler on the root logger; every line carries the request id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(API_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def configure_worker_logging(worker_index: int, level: str) -> None:
    """Worker processes start with bare logging (spawn); give them the same shape of line.

    Runs in the worker process.
    """
    if logging.getLogger().handlers:
        return  # someone configured it on purpose
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(),
        format=f"%(asctime)s %(levelname)-7s %(name)s [worker {worker_index}] %(message)s")
