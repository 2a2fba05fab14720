"""OpenTelemetry, opt-in: a request span in the API process, and queue-wait and execution
spans drawn in the worker as its children (the trace context crosses with the task)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from app_helpers import image_bytes, running_app, settings
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from app.main import create_app
from app.ops import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def global_provider():
    """An SDK provider with an in-memory exporter as the process's tracer provider; the
    global is put back afterwards so that other tests run untraced."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    tracing._enabled = False


def console_spans(text: str) -> list[dict]:
    """The spans ConsoleSpanExporter printed (indented JSON objects, one after another)."""
    decoder = json.JSONDecoder()
    spans, index = [], text.find("{\n")
    while index != -1:
        span, end = decoder.raw_decode(text, index)
        spans.append(span)
        index = text.find("{\n", end)
    return spans


@pytest.mark.parametrize("request_spans", ["fastapi", "middleware"])
def test_request_span_has_queue_wait_and_execution_children_from_the_worker(
        global_provider, monkeypatch, capfd, request_spans):
    if request_spans == "middleware":  # as with a FastAPI without native telemetry
        monkeypatch.setattr(tracing, "fastapi_traces_requests", lambda: False)
    # The workers (spawned processes) build their own provider from the standard variables.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "spool-test")
    with running_app(settings(worker_class="app_helpers:LoggingEchoWorker")) as client:
        response = client.post(
            "/predict", files=[("files", ("a.png", image_bytes("PNG", (32, 32))))],
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
        assert response.status_code == 200, response.text
    # Leaving the app stopped the workers, which flushed their spans.
    [request_span] = [s for s in global_provider.get_finished_spans()
                      if s.attributes.get("http.route") == "/predict"
                      and s.kind == trace.SpanKind.SERVER
                      and ("request.id" in s.attributes) == (request_spans == "middleware")]
    assert request_span.name == "POST /predict"
    assert request_span.kind == trace.SpanKind.SERVER
    assert format(request_span.context.trace_id, "032x") == TRACE_ID
    assert format(request_span.parent.span_id, "016x") == CLIENT_SPAN
    assert request_span.attributes["http.response.status_code"] == 200
    # Parents in the API process: the request span, or (native FastAPI telemetry) its
    # endpoint span; either way the worker's spans descend from the request.
    parents = {f"0x{s.context.span_id:016x}": s.parent
               for s in global_provider.get_finished_spans()}

    def descends_from_request(span_id: str) -> bool:
        while span_id in parents:
            if span_id == f"0x{request_span.context.span_id:016x}":
                return True
            parent = parents[span_id]
            span_id = "" if parent is None else f"0x{parent.span_id:016x}"
        return False

    worker_spans = {s["name"]: s for s in console_spans(capfd.readouterr().out)}
    assert worker_spans.keys() == {"queue wait", "execute"}
    for span in worker_spans.values():
        assert span["context"]["trace_id"] == f"0x{TRACE_ID}"
        assert descends_from_request(span["parent_id"]), span
        assert span["resource"]["attributes"]["service.name"] == "spool-test"
        assert span["attributes"]["request.id"] == response.headers["x-request-id"]
    queued, executed = worker_spans["queue wait"], worker_spans["execute"]
    assert queued["end_time"] <= executed["start_time"] <= executed["end_time"]
    assert executed["attributes"]["batch.size"] == 1
    assert request_span.start_time <= request_span.end_time


def test_a_streamed_answer_is_one_execute_span_from_its_first_step_to_its_end(
        global_provider, monkeypatch, capfd):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "spool-test")
    with running_app(settings(worker_class="app.examples.progress:Progress",
                              model_name="progress")) as client:
        response = client.post("/predict", json={"steps": 3, "step_s": 0.1, "stream": True},
                               headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
        assert response.text.count("data: ") == 3
    spans = console_spans(capfd.readouterr().out)
    assert sorted(s["name"] for s in spans) == ["execute", "queue wait"]
    [executed] = [s for s in spans if s["name"] == "execute"]
    assert executed["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert executed["attributes"]["request.id"] == response.headers["x-request-id"]
    # The span lasts as long as the generator ran: three steps of 0.1 s.
    started, ended = (datetime.fromisoformat(executed[k]) for k in ("start_time", "end_time"))
    assert (ended - started).total_seconds() >= 0.25


def test_tracing_off_adds_nothing(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    app = create_app(settings(worker_class="app_helpers:LoggingEchoWorker"))
    assert not app.state.server.telemetry.tracing
    assert not any(m.cls is tracing.TracingMiddleware for m in app.user_middleware)
    assert tracing.task_context() == {"request_id": "-"}
