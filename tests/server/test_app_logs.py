"""LOG_FORMAT=json: every line the server and its workers write is one JSON object."""

from __future__ import annotations

import json

from app_helpers import http_client, image_bytes, serve, wait_ready


def test_json_logs_parse_line_by_line_with_request_and_worker_ids(tmp_path):
    with serve(tmp_path, WORKER_CLASS="app_helpers:LoggingEchoWorker",
               LOG_FORMAT="json") as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        ok = http.post("/predict", headers={"X-Request-ID": "json-log-1"},
                       files=[("files", ("a.png", image_bytes("PNG", (32, 32))))])
        assert ok.status_code == 200, ok.text
        bad = http.post("/predict", files=[("files", ("a.txt", b"not an image"))])
        assert bad.status_code == 415
        process.terminate()
        assert process.wait(timeout=30) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # fails the test on any line that is not JSON
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        records.append(record)
    access = [r for r in records if r["logger"] == "app.access"]
    assert {"method": "POST", "path": "/predict", "status": 200,
            "request_id": "json-log-1"}.items() <= next(
        r for r in access if r["status"] == 200).items()
    assert all(isinstance(r["duration_ms"], float) for r in access)
    assert any(r["status"] == 415 and r["request_id"] == bad.headers["x-request-id"]
               for r in access)
    [worker_line] = [r for r in records if r["logger"] == "app_helpers.worker"]
    assert worker_line["worker_id"] == 0 and worker_line["request_id"] == "json-log-1"
    assert worker_line["message"] == "echoing 1 item(s)"
    # Lines from uvicorn and from the app's lifespan are JSON too.
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert any(r["message"] == "workers stopped" for r in records)
