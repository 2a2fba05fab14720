"""OpenTelemetry tracing, opt-in: a span per request, and in the worker a ``queue wait`` and an
``execute`` span per task, children of the request's span.

On when the standard variables ask for it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) for OTLP over HTTP, or ``OTEL_TRACES_EXPORTER=otlp |
console``; ``OTEL_SERVICE_NAME`` names the service (default ``stateful-pool``);
``OTEL_SDK_DISABLED=true`` wins. A program that sets its own SDK tracer provider before
``create_app`` gets its spans there. Off, nothing is imported and no middleware is added; the
task context carries the request id only.

The trace context crosses into the worker with the task (``pool.with_context``): the W3C
``traceparent`` of the request span and the submission time, from which the worker draws the
queue-wait span (submission -> the worker starts the batch) and the execution span.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .logs import request_id_var

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SERVICE_DEFAULT = "stateful-pool"
_enabled = False


def requested() -> bool:
    """Whether the environment (or the embedding program) asks for tracing."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return True
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return False
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def enable() -> bool:
    """Turn tracing on in the API process if requested; True when on."""
    global _enabled
    _enabled = requested()
    if _enabled:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(make_provider({}))
    return _enabled


def make_provider(attributes: dict[str, Any]) -> Any:
    """An SDK tracer provider exporting as ``OTEL_TRACES_EXPORTER`` says (default OTLP)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_DEFAULT), **attributes})
    provider = TracerProvider(resource=resource)
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if kind == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def fastapi_traces_requests() -> bool:
    """Whether this FastAPI has native OpenTelemetry (``FastAPI(telemetry=...)``): it then
    makes the request spans from the global tracer provider, and ``TracingMiddleware``
    would only duplicate them."""
    from fastapi import FastAPI

    return "telemetry" in inspect.signature(FastAPI.__init__).parameters


def task_context() -> dict[str, Any]:
    """What travels to the worker with each task: the request id, and with tracing the
    current span's ``traceparent`` and the submission time."""
    context: dict[str, Any] = {"request_id": request_id_var.get()}
    if _enabled:
        from opentelemetry.propagate import inject

        inject(context)
        context["submitted_ns"] = time.time_ns()
    return context


class TracingMiddleware:
    """A server span per HTTP request, continuing the client's ``traceparent`` if any; for a
    FastAPI without native telemetry."""

    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry import trace

        self.app = app
        self.tracer = trace.get_tracer("app")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
                f"{scope['method']} {scope['path']}", context=extract(carrier),
                kind=SpanKind.SERVER, attributes={
                    "http.request.method": scope["method"], "url.path": scope["path"],
                    "request.id": request_id_var.get()}) as span:
            try:
                await self.app(scope, receive, send_and_record)
            finally:
                route = scope.get("route")
                if route is not None and hasattr(route, "path"):
                    span.set_attribute("http.route", route.path)
                    span.update_name(f"{scope['method']} {route.path}")
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))


# ---- in the worker --------------------------------------------------------------------------

def worker_tracer(worker_id: int) -> tuple[Tracer, Any]:
    """The worker's tracer and provider. Runs in the worker process."""
    provider = make_provider({"worker.id": worker_id})
    return provider.get_tracer("app.worker"), provider


@contextmanager
def task_spans(tracer: Tracer, contexts: list[dict[str, Any]], batch_size: int
               ) -> Iterator[None]:
    """A queue-wait span (ended now) and an execution span (around the block) for each
    traced task of the batch. Runs in the worker process."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import Status, StatusCode

    started = time.time_ns()
    spans = []
    for context in contexts:
        if "traceparent" not in context:
            continue
        parent = extract(context)
        attributes: dict[str, Any] = {"request.id": str(context.get("request_id", "-")),
                      "batch.size": batch_size}
        tracer.start_span("queue wait", context=parent, attributes=attributes,
                          start_time=int(context.get("submitted_ns", started))).end(started)
        spans.append(tracer.start_span("execute", context=parent, attributes=attributes,
                                       start_time=started))
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR))
        raise
    finally:
        for span in spans:
            span.end()
