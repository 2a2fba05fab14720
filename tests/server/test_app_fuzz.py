"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) over a real socket: whatever
a client sends, the server answers without a 5xx, with the documented content, and keeps
serving. One JSON model (text) and one upload model (the default ViT, vit_tiny)."""

from __future__ import annotations

import pytest
import schemathesis
from app_helpers import served
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("worker_class", ["app.examples.text:TextClassifier",
                                          "app.worker:ViTWorker"])
def test_any_request_gets_a_documented_non_5xx_answer(tmp_path, worker_class):
    with served(tmp_path, worker_class, MODEL_WEIGHTS="random", MAX_BATCH_SIZE="4") as http:
        base = str(http.base_url).rstrip("/")
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert any(op.path == "/predict" for op in operations)
        for operation in operations:
            fuzz(operation)
        # Still serving after everything the fuzzer sent.
        assert http.get("/readyz").status_code == 200


def fuzz(operation: schemathesis.APIOperation) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(case=operation.as_strategy())
    def one(case: schemathesis.Case) -> None:
        response = case.call(timeout=30)
        # 504 is the documented answer to a deadline the client itself made too short, and
        # 503 its answer at once, when the server sees it cannot be met.
        asked_deadline = "X-Request-Timeout" in (case.headers or {})
        assert response.status_code < 500 or (response.status_code in (503, 504)
                                               and asked_deadline), (
            case.method, case.path, case.headers, response.status_code, response.text[:500])
        case.validate_response(response, checks=(response_schema_conformance,
                                                  content_type_conformance))

    one()
