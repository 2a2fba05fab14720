"""Log format for the API process and the worker processes: text (default) or JSON lines.

``LOG_FORMAT=json`` makes every line one JSON object (python-json-logger): ``time``,
``level``, ``logger``, ``message``, ``request_id``, ``worker_id`` in a worker, the fields an
access line carries (``method``, ``path``, ``status``, ``duration_ms``) and ``exc_info`` for
a traceback. In a worker, ``request_id`` is the id of the request whose task is running
(several, comma-separated, during a batch), carried by ``pool.with_context``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Literal

from stateful_pool import current_contexts

LogFormat = Literal["text", "json"]

API_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"
WORKER_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [worker %(worker_id)s %(request_id)s] " \
                "%(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``%(request_id)s`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class WorkerContextFilter(logging.Filter):
    """Adds ``worker_id`` and the running tasks' ``request_id``. Runs in the worker process."""

    def __init__(self, worker_id: int) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker_id = self.worker_id
        ids = [str(c["request_id"]) for c in current_contexts() if c.get("request_id")]
        record.request_id = ",".join(dict.fromkeys(ids)) or "-"
        return True


def formatter(log_format: LogFormat, text_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, json_ensure_ascii=False)
    return logging.Formatter(text_format)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """One stderr handler on the root logger; every line carries the request id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, API_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def configure_worker_logging(worker_index: int, level: str,
                             log_format: LogFormat = "text") -> None:
    """Worker processes start with bare logging (spawn); give them the same shape of line.

    Runs in the worker process.
    """
    root = logging.getLogger()
    if root.handlers:
        return  # someone configured it on purpose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, WORKER_FORMAT))
    handler.addFilter(WorkerContextFilter(worker_index))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
