"""Streamed answers over a real socket: server-sent events as a client reads them.

Two servers for the module, each ``python -m app`` with one worker: ``app_streams:Ticker``
(a generator ``execute``) and ``app_streams:StepTicker`` (``stream_open`` / ``stream_step`` /
``stream_close``: continuous batching). Their workers leave marks in ``MARK_DIR`` (how many
chunks a stream produced, whether its ``finally`` ran or ``stream_close`` was called), so what
happened in the worker is checked from outside the server.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_helpers import http_client, serve, wait_ready
from httpx_sse import connect_sse
from procs import wait_until

pytestmark = pytest.mark.slow

CHUNK_TIMEOUT_S = 1.0


class Server:
    def __init__(self, process: Any, http: httpx.Client, log: Path, marks: Path) -> None:
        self.process, self.http, self.log, self.marks = process, http, log, marks
        self.names = iter(range(1_000_000))

    def name(self, what: str) -> str:
        """A fresh stream name: its marks are its own."""
        return f"{what}-{next(self.names)}"

    def steps(self, name: str) -> int:
        path = self.marks / f"{name}.steps"
        return int(path.read_text() or 0) if path.exists() else 0

    def closed(self, name: str) -> bool:
        return (self.marks / f"{name}.closed").exists()

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found[1]) if found else 0.0


@pytest.fixture(scope="module")
def ticker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from start(tmp_path_factory, "app_streams:Ticker", QUEUE_SIZE="2")


@pytest.fixture(scope="module")
def step_ticker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from start(tmp_path_factory, "app_streams:StepTicker", MAX_BATCH_SIZE="8")


def start(factory: pytest.TempPathFactory, worker_class: str, **env: str) -> Any:
    tmp = factory.mktemp("streams")
    marks = tmp / "marks"
    marks.mkdir()
    with serve(tmp, WORKER_CLASS=worker_class, MODEL_NAME="ticks", NUM_WORKERS="1",
               STREAM_CHUNK_TIMEOUT_S=str(CHUNK_TIMEOUT_S), MARK_DIR=str(marks),
               **env) as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        yield Server(process, http, log, marks)


def read_events(http: httpx.Client, body: dict[str, Any], path: str = "/predict",
                headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, Any, float]]]:
    """The status, and each event as it arrived: (event name, data as JSON, seconds since
    the request was sent)."""
    started = time.monotonic()
    with connect_sse(http, "POST", path, json=body, headers=dict(headers or {})) as source:
        if source.response.status_code != 200:
            source.response.read()
            return source.response.status_code, [("answer", source.response.json(), 0.0)]
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return 200, [(sse.event, json.loads(sse.data), time.monotonic() - started)
                     for sse in source.iter_sse()]


def ticks(events: list[tuple[str, Any, float]]) -> list[int]:
    return [data["i"] for name, data, _ in events if name == "message"]


# ---- a generator execute ---------------------------------------------------------------------

def test_an_sse_client_gets_each_chunk_as_the_worker_writes_it(ticker):
    status, events = read_events(ticker.http, {"n": 4, "step_s": 0.4,
                                               "name": ticker.name("sse")})
    assert status == 200
    assert ticks(events) == [0, 1, 2, 3]
    arrivals = [at for _, _, at in events]
    # Each event came as its chunk was written, not all at the end.
    assert all(b - a > 0.2 for a, b in zip(arrivals, arrivals[1:], strict=False))


def test_the_same_route_answers_json_when_no_stream_is_asked_for(ticker):
    response = ticker.http.post("/predict", json={"n": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"chunks": [{"i": 0}, {"i": 1}, {"i": 2}]}


def test_a_true_stream_field_asks_for_events_without_the_accept_header(ticker):
    with ticker.http.stream("POST", "/predict", json={"n": 2, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    assert body == 'data: {"i":0}\n\ndata: {"i":1}\n\n'


def test_a_client_that_leaves_mid_stream_stops_the_generator_at_its_next_yield(ticker):
    name = ticker.name("leave")
    abandoned = ticker.metric("http_requests_abandoned_total")
    with ticker.http.stream("POST", "/predict", json={"n": 100_000, "step_s": 0.05,
                                                      "name": name, "stream": True}) as response:
        lines = response.iter_lines()
        received = [line for line in (next(lines) for _ in range(6)) if line]
    left_at = ticker.steps(name)
    assert len(received) == 3
    assert wait_until(lambda: ticker.closed(name), 5), "the generator's finally never ran"
    # Stopped within a step or two of the client's departure, not after the stream's end.
    assert ticker.steps(name) <= left_at + 2
    assert wait_until(lambda: "client left" in ticker.log.read_text(), 5)
    assert re.search(r'"POST /predict" 200 [0-9.]+ ms \(stream: \d+ chunks, client left\)',
                     ticker.log.read_text())
    assert ticker.metric("http_requests_abandoned_total") == abandoned + 1
    # The worker is free again at once.
    assert ticker.http.post("/predict", json={"n": 1}).json() == {"chunks": [{"i": 0}]}


def test_a_worker_crash_mid_stream_is_an_error_event_after_the_chunks_then_it_serves_again(
        ticker):
    status, events = read_events(ticker.http, {"n": 5, "crash_after": 2,
                                               "name": ticker.name("crash")})
    assert status == 200
    assert ticks(events) == [0, 1]
    name, data, _ = events[-1]
    assert name == "error" and "crashed" in data["detail"], events
    wait_ready(ticker.http, ticker.process, ticker.log)
    assert ticks(read_events(ticker.http, {"n": 3})[1]) == [0, 1, 2]


def test_input_the_model_refuses_is_400_before_the_first_chunk_and_an_error_event_after(
        ticker):
    status, events = read_events(ticker.http, {"n": 3, "invalid_after": 0})
    assert status == 400
    assert events[0][1] == {"detail": "tick 0 cannot be written"}
    status, events = read_events(ticker.http, {"n": 13})  # refused by to_stream
    assert (status, events[0][1]) == (400, {"detail": "13 ticks bring bad luck"})
    status, events = read_events(ticker.http, {"n": 5, "invalid_after": 2})
    assert status == 200 and ticks(events) == [0, 1]
    assert events[-1][:2] == ("error", {"detail": "tick 2 cannot be written"})


def test_bad_requests_are_refused_while_another_client_streams_unharmed(ticker):
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(read_events, ticker.http, {"n": 20, "step_s": 0.05})
        for body in ({"n": -1}, {"n": "many"}, {"step_s": "slow"}):
            response = ticker.http.post("/predict", json=body,
                                        headers={"Accept": "text/event-stream"})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"][0] == "body"
        assert ticker.http.post("/predict", json={"n": 13}).status_code == 400
        status, events = other.result(timeout=30)
    assert status == 200 and ticks(events) == list(range(20))


def test_a_full_queue_is_503_and_a_stream_past_its_deadline_before_its_first_chunk_is_504(
        ticker):
    # One worker, QUEUE_SIZE=2: one stream runs, two wait, the fourth is refused.
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(read_events, ticker.http, {"n": 30, "step_s": 0.05})
        assert wait_until(lambda: ticker.metric("pool_in_flight") == 1, 10)
        waiting = [pool.submit(read_events, ticker.http, {"n": 1},
                               headers={"X-Request-Timeout": "1"}) for _ in range(2)]
        assert wait_until(lambda: ticker.metric("pool_queue_depth") == 2, 10)
        response = ticker.http.post("/predict", json={"n": 1, "stream": True})
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        for future in waiting:
            status, events = future.result(timeout=30)
            assert status == 504
            assert "did not start its answer within the request's deadline" in \
                events[0][1]["detail"]
        assert ticks(running.result(timeout=30)[1]) == list(range(30))


def test_a_stream_that_goes_quiet_past_stream_chunk_timeout_ends_with_an_error_event(ticker):
    status, events = read_events(ticker.http, {"n": 4, "gap_after": 2,
                                               "gap_s": CHUNK_TIMEOUT_S + 0.6})
    assert status == 200 and ticks(events) == [0, 1]
    name, data, _ = events[-1]
    assert name == "error"
    assert data["detail"] == ("the stream wrote no chunk for STREAM_CHUNK_TIMEOUT_S=1 s; "
                              "it was stopped")


def test_a_json_answer_of_a_stream_is_bounded_by_the_request_deadline(ticker):
    response = ticker.http.post("/predict", json={"n": 5, "step_s": 0.4},
                                headers={"X-Request-Timeout": "1"})
    assert response.status_code == 504
    assert response.json()["detail"].startswith(
        "the model did not finish its answer within the request's deadline of 1 s")


def test_openapi_documents_the_event_stream_and_the_json_answer(ticker):
    spec = ticker.http.get("/openapi.json").json()
    ok = spec["paths"]["/predict"]["post"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TickerChunks"}
    events = ok["content"]["text/event-stream"]["schema"]
    assert events["properties"] == {"i": {"title": "I", "type": "integer"}}
    assert "event: error" in ok["description"]
    stream = spec["paths"]["/v2/models/{name}/generate_stream"]["post"]["responses"]["200"]
    assert stream["content"]["text/event-stream"]["schema"]["required"] == ["i"]


def test_metrics_count_the_time_to_the_first_chunk_and_the_chunks_per_stream(ticker):
    first = ticker.metric("stream_first_chunk_seconds_count")
    chunks = ticker.metric("stream_chunks_sum")
    assert read_events(ticker.http, {"n": 7})[0] == 200
    assert wait_until(lambda: ticker.metric("stream_chunks_sum") == chunks + 7, 5)
    assert ticker.metric("stream_first_chunk_seconds_count") == first + 1


def test_the_generate_routes_answer_in_tritons_shapes(ticker):
    response = ticker.http.post("/v2/models/ticks/generate",
                                json={"n": 2, "parameters": {"step_s": 0.01}})
    assert response.status_code == 200, response.text
    assert response.json() == {"model_name": "ticks", "model_version": "1",
                               "chunks": [{"i": 0}, {"i": 1}]}
    status, events = read_events(ticker.http, {"n": 2}, "/v2/models/ticks/generate_stream")
    assert status == 200
    assert [data for _, data, _ in events] == [
        {"model_name": "ticks", "model_version": "1", "i": 0},
        {"model_name": "ticks", "model_version": "1", "i": 1}]
    status, events = read_events(ticker.http, {"n": 4, "invalid_after": 1},
                                 "/v2/models/ticks/versions/1/generate_stream")
    assert [data for _, data, _ in events] == [
        {"model_name": "ticks", "model_version": "1", "i": 0},
        {"error": "tick 1 cannot be written"}]
    refused = ticker.http.post("/v2/models/ticks/generate_stream", json={"n": -1})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("invalid inference request: n:")
    assert ticker.http.post("/v2/models/other/generate", json={}).status_code == 404


# ---- stream_open / stream_step / stream_close ------------------------------------------------

def test_a_client_that_leaves_mid_stream_has_its_stream_closed_in_the_batch(step_ticker):
    name = step_ticker.name("leave")
    with step_ticker.http.stream("POST", "/predict", json={
            "n": 100_000, "step_s": 0.05, "name": name, "stream": True}) as response:
        lines = response.iter_lines()
        assert [line for line in (next(lines) for _ in range(4)) if line]
    left_at = step_ticker.steps(name)
    assert wait_until(lambda: step_ticker.closed(name), 5), "stream_close was never called"
    assert step_ticker.steps(name) <= left_at + 2


def test_a_new_stream_joins_the_running_batch_and_ends_before_it(step_ticker):
    long, short = step_ticker.name("long"), step_ticker.name("short")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(read_events, step_ticker.http,
                              {"n": 60, "step_s": 0.05, "name": long})
        assert wait_until(lambda: step_ticker.steps(long) >= 5, 10)
        # One worker: with one stream at a time, this one would wait for the long one.
        status, events = read_events(step_ticker.http, {"n": 5, "name": short})
        assert status == 200 and ticks(events) == [0, 1, 2, 3, 4]
        assert not step_ticker.closed(long)
        assert ticks(running.result(timeout=30)[1]) == list(range(60))


def test_a_stream_that_cannot_open_is_400_and_the_batch_goes_on(step_ticker):
    response = step_ticker.http.post("/predict", json={"n": 3, "invalid_after": 0})
    assert response.status_code == 400
    assert response.json() == {"detail": "this stream cannot open"}
    assert step_ticker.http.post("/predict", json={"n": 2}).json() == {
        "chunks": [{"i": 0}, {"i": 1}]}
