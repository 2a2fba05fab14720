"""The two streaming examples served as ``make serve`` runs them, offline.

``app.examples.causal_lm:CausalLM`` on a tiny random GPT-2 written to disk
(``make_tiny``): its text streams token by token, concurrent streams share one worker's
forward steps (continuous batching) and each still gets exactly the text it gets alone.
``app.examples.progress:Progress``: the contract without a model.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from app_helpers import ROOT, free_port, http_client, serve, served, wait_ready
from httpx_sse import connect_sse

pytestmark = pytest.mark.slow

SERVED = "tiny-lm"
PROMPTS = ["the quick brown fox", "hello world", "a tiny language model", "over the lazy dog"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, tiny_lm: str) -> Any:
    tmp = tmp_path_factory.mktemp("lm")
    # The hub is a closed local port, as on a machine offline.
    with serve(tmp, WORKER_CLASS="app.examples.causal_lm:CausalLM", MODEL_NAME=tiny_lm,
               SERVED_MODEL_NAME=SERVED, NUM_WORKERS="1", MAX_BATCH_SIZE="8",
               LM_MAX_PROMPT_TOKENS="64", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               HF_HOME=str(tmp / "hf")) as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        yield http


def stream_text(http: httpx.Client, body: dict[str, Any], path: str = "/predict"
                ) -> tuple[list[dict[str, Any]], float, float]:
    """The chunks of a streamed answer, and when its first and last arrived."""
    chunks, first = [], 0.0
    with connect_sse(http, "POST", path, json=body) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            assert sse.event == "message", sse.data
            chunks.append(json.loads(sse.data))
            first = first or time.monotonic()
    return chunks, first, time.monotonic()


def answer(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_tiny_lm_streams_its_text_and_answers_the_same_text_in_json(lm):
    body = {"prompt": PROMPTS[0], "max_tokens": 12}
    whole = answer(lm, body)
    chunks, _, _ = stream_text(lm, {**body, "stream": True})
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum(c["tokens"] for c in chunks) == whole["completion_tokens"]
    assert chunks[0]["prompt_tokens"] == whole["prompt_tokens"] > 0
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    if whole["finish_reason"] == "length":
        assert whole["completion_tokens"] == 12


def test_concurrent_streams_share_one_worker_and_each_writes_what_it_writes_alone(lm):
    bodies = [{"prompt": p, "max_tokens": 60 + 30 * n} for n, p in enumerate(PROMPTS)]
    alone = [answer(lm, body)["text"] for body in bodies]
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        streams = [pool.submit(stream_text, lm, {**b, "stream": True}) for b in bodies]
        running_at_once = 0
        while not all(s.done() for s in streams):
            gauges = metrics(lm, "pool_in_flight", "pool_queue_depth", "pool_busy_workers")
            if gauges["pool_queue_depth"] == 0 and gauges["pool_busy_workers"] == 1:
                running_at_once = max(running_at_once, int(gauges["pool_in_flight"]))
        together = [s.result(timeout=60) for s in streams]
    assert ["".join(c["text"] for c in chunks) for chunks, _, _ in together] == alone
    # One worker held the streams at once, none waiting in the queue: one batch.
    assert running_at_once >= 3


def metrics(http: httpx.Client, *names: str) -> dict[str, float]:
    lines = dict(line.split(" ", 1) for line in http.get("/metrics").text.splitlines()
                 if line and not line.startswith("#"))
    return {name: float(lines[name]) for name in names}


def test_stop_strings_end_the_text_before_them(lm):
    text = answer(lm, {"prompt": PROMPTS[1], "max_tokens": 24})["text"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].isprintable())
    stopped = answer(lm, {"prompt": PROMPTS[1], "max_tokens": 24, "stop": [stop]})
    assert stopped["text"] == text[:text.find(stop)]
    assert stopped["finish_reason"] == "stop"


def test_chat_messages_and_a_seed_make_sampling_repeatable(lm):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = answer(lm, body)
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert answer(lm, body) == first


def test_a_request_the_model_refuses_is_400_and_a_malformed_one_422(lm):
    response = lm.post("/predict", json={"prompt": "the quick " * 50, "stream": True})
    assert response.status_code == 400
    assert "LM_MAX_PROMPT_TOKENS=64" in response.json()["detail"]
    response = lm.post("/predict", json={"prompt": "a", "messages": [{"role": "user",
                                                                      "content": "b"}]})
    assert response.status_code == 422
    assert "exactly one of 'prompt' and 'messages'" in response.text


def test_the_generate_routes_answer_in_tritons_shapes(lm):
    body = {"prompt": PROMPTS[2], "parameters": {"max_tokens": 6}}
    whole = lm.post(f"/v2/models/{SERVED}/generate", json=body)
    assert whole.status_code == 200, whole.text
    reply = whole.json()
    assert set(reply) == {"model_name", "model_version", "text", "finish_reason",
                          "prompt_tokens", "completion_tokens"}
    assert (reply["model_name"], reply["model_version"]) == (SERVED, "1")
    events, _, _ = stream_text(lm, body, f"/v2/models/{SERVED}/generate_stream")
    assert all((e["model_name"], e["model_version"]) == (SERVED, "1") for e in events)
    assert "".join(e["text"] for e in events) == reply["text"]
    refused = lm.post(f"/v2/models/{SERVED}/generate_stream",
                      json={"prompt": "x " * 200, "parameters": {"max_tokens": 6}})
    assert refused.status_code == 400
    assert "LM_MAX_PROMPT_TOKENS" in refused.json()["error"]


def test_the_progress_example_streams_its_steps(tmp_path):
    with served(tmp_path, "app.examples.progress:Progress") as http:
        started = time.monotonic()
        chunks, first, last = stream_text(http, {"steps": 3, "step_s": 0.3})
        assert chunks == [{"step": 1, "of": 3, "done": 1 / 3},
                          {"step": 2, "of": 3, "done": 2 / 3},
                          {"step": 3, "of": 3, "done": 1.0}]
        assert first - started < 0.6 < last - started  # step by step, not at the end
        assert answer(http, {"steps": 2, "step_s": 0})["chunks"][-1]["done"] == 1.0


def test_the_guide_shows_the_progress_example_as_it_is():
    guide = (ROOT / "docs" / "SERVE_YOUR_MODEL.md").read_text()
    block = re.search(r"```python\n(class Job\(BaseModel\):.*?)```", guide, re.DOTALL)
    assert block, "the progress example left docs/SERVE_YOUR_MODEL.md"
    assert block[1] in (ROOT / "app" / "examples" / "progress.py").read_text()
