"""The served worker inside a thin shell that sets up its logs and tracing.

The pool spawns ``ServedWorker`` (or ``ServedBatchWorker`` when the worker defines
``execute_batch``, ``ServedStreamStepWorker`` when it defines ``stream_step``, so batching is
decided as for the worker itself) with the worker's class and config; the shell configures
the worker process's logging (``LOG_FORMAT``, worker id, request ids) and, when tracing is
on, its tracer, then creates the worker and hands every call to it. A worker file needs
nothing of this.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stateful_pool import SWorker, current_contexts

from ..contract import ModelWorker, WorkerConfig
from ..ops.logs import LogFormat, configure_worker_logging


@dataclass(frozen=True)
class Telemetry:
    log_format: LogFormat = "text"
    tracing: bool = False


class ServedWorker(SWorker[Any, Any]):
    """Runs in the worker process: logging and tracing first, then the worker itself."""

    inner: SWorker[Any, Any]
    tracer: Any = None
    provider: Any = None

    def spawn(self, worker_cls: type[SWorker[Any, Any]], config: WorkerConfig,
              telemetry: Telemetry) -> Any:
        configure_worker_logging(config.worker_index, config.log_level, telemetry.log_format)
        if telemetry.tracing:
            from ..ops.tracing import worker_tracer

            self.tracer, self.provider = worker_tracer(config.worker_index)
        self.inner = worker_cls()
        return self.inner.spawn(config)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.tracer is None:
            return self.inner.execute(*args, **kwargs)
        from ..ops.tracing import task_spans

        contexts = current_contexts()
        if inspect.isgeneratorfunction(type(self.inner).execute):
            return self._traced_stream(self.inner.execute(*args, **kwargs), contexts)
        with task_spans(self.tracer, contexts, 1):
            return self.inner.execute(*args, **kwargs)

    def _traced_stream(self, chunks: Iterator[Any], contexts: list[dict[str, Any]]
                       ) -> Iterator[Any]:
        """The generator's whole life, first step to close, is the stream's span."""
        from ..ops.tracing import task_spans

        with task_spans(self.tracer, contexts, 1):
            yield from chunks

    def close(self) -> None:
        try:
            close = getattr(getattr(self, "inner", None), "close", None)
            if close is not None:
                close()
        finally:
            if self.provider is not None:
                self.provider.shutdown()  # flushes the spans still batched


class ServedBatchWorker(ServedWorker):
    def execute_batch(self, items: list[Any]) -> list[Any]:
        inner: Any = self.inner
        if self.tracer is None:
            return inner.execute_batch(items)  # type: ignore[no-any-return]
        from ..ops.tracing import task_spans

        with task_spans(self.tracer, current_contexts(), len(items)):
            return inner.execute_batch(items)  # type: ignore[no-any-return]


class ServedStreamStepWorker(ServedWorker):
    """The shell of a worker with ``stream_step``: the pool sees the three methods, so it
    runs the worker's streams as one continuous batch."""

    def stream_open(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.stream_open(*args, **kwargs)  # type: ignore[attr-defined]

    def stream_step(self, states: list[Any]) -> list[Any]:
        return self.inner.stream_step(states)  # type: ignore[attr-defined, no-any-return]

    def stream_close(self, state: Any) -> None:
        close = getattr(self.inner, "stream_close", None)
        if close is not None:
            close(state)


def shell_for(worker_cls: type[SWorker[Any, Any]]) -> type[ServedWorker]:
    if callable(getattr(worker_cls, "stream_step", None)):
        return ServedStreamStepWorker
    batching = callable(getattr(worker_cls, "execute_batch", None))
    # A ModelWorker that defines only execute(item) is served item by item: the
    # execute_batch it inherits would only raise NotImplementedError.
    if (issubclass(worker_cls, ModelWorker) and worker_cls.execute_batch is
            ModelWorker.execute_batch and worker_cls.execute is not ModelWorker.execute):
        batching = False
    return ServedBatchWorker if batching else ServedWorker
