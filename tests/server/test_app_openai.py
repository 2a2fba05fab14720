"""The OpenAI routes, driven by the official ``openai`` client (sync and async) over a real
socket: the tiny causal LM for completions and chat, the text embedder for embeddings."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import httpx
import openai
import pytest
from app_helpers import free_port, http_client, serve, wait_ready, wait_until

pytestmark = pytest.mark.slow

SERVED = "tiny-lm"
KEY = "sk-test-key"
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def lm_url(tmp_path_factory: pytest.TempPathFactory, tiny_lm: str) -> Any:
    tmp = tmp_path_factory.mktemp("openai-lm")
    with serve(tmp, WORKER_CLASS="app.examples.causal_lm:CausalLM", MODEL_NAME=tiny_lm,
               SERVED_MODEL_NAME=SERVED, NUM_WORKERS="1", MAX_BATCH_SIZE="2", QUEUE_SIZE="2",
               API_KEY=KEY, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               HF_HOME=str(tmp / "hf")) as (process, url, log), http_client(url) as http:
        wait_ready(http, process, log)
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def predict(url: str, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as http:
        response = http.post("/predict", json=body)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def test_models_lists_the_served_model(lm_url):
    models = client(lm_url).models.list()
    assert [m.id for m in models.data] == [SERVED]
    assert client(lm_url).models.retrieve(SERVED).id == SERVED


def test_a_completion_is_the_models_own_text_streamed_or_not(lm_url):
    expected = predict(lm_url, {"prompt": PROMPT, "max_tokens": 12})
    api = client(lm_url)
    done = api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected["text"]
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.prompt_tokens == expected["prompt_tokens"]
    assert done.usage.completion_tokens == 12
    chunks = list(api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_from_the_async_client_streamed_or_not(lm_url):
    messages = [{"role": "user", "content": "hello"}]
    expected = predict(lm_url, {"messages": messages, "max_tokens": 10})

    async def both() -> tuple[Any, list[Any]]:
        api = openai.AsyncOpenAI(base_url=f"{lm_url}/v1", api_key=KEY, max_retries=0)
        async with api:
            done = await api.chat.completions.create(model=SERVED, messages=messages,
                                                     max_tokens=10, temperature=0)
            stream = await api.chat.completions.create(model=SERVED, messages=messages,
                                                       max_tokens=10, temperature=0,
                                                       stream=True)
            return done, [chunk async for chunk in stream]

    done, chunks = asyncio.run(asyncio.wait_for(both(), 60))
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_stop_strings_and_seeds_reach_the_model(lm_url):
    api = client(lm_url)
    alone = api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0)
    text = alone.choices[0].text
    stop = text[4:7]
    stopped = api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16,
                                     temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]
    sampled = api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=8,
                                     temperature=1.0, seed=7, n=2)
    again = api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=8,
                                   temperature=1.0, seed=7, n=2)
    assert [c.index for c in sampled.choices] == [0, 1]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_a_parameter_the_model_does_not_take_is_a_400_naming_it(lm_url):
    api = client(lm_url)
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4,
                               presence_penalty=0.5)
    assert refused.value.body["param"] == "presence_penalty"  # type: ignore[index]
    assert "does not support" in refused.value.body["message"]  # type: ignore[index]
    # Its neutral value asks for nothing: accepted.
    api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4, presence_penalty=0)
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=SERVED, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "data:,"}}]}])
    assert refused.value.body["param"] == "messages[0].content"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_an_unknown_model_and_a_wrong_key_are_the_clients_own_errors(lm_url):
    with pytest.raises(openai.NotFoundError) as unknown:
        client(lm_url).completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert SERVED in unknown.value.body["message"]  # type: ignore[index]
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        client(lm_url, key="sk-wrong").models.list()


def test_a_full_queue_is_a_503_with_retry_after(lm_url):
    """Two streams run (the batch holds two), two wait (QUEUE_SIZE=2): one more is refused.
    The held streams are left unread, so they stay in place (paused for their readers)."""
    async def fill_then_one_more() -> openai.APIStatusError:
        api = openai.AsyncOpenAI(base_url=f"{lm_url}/v1", api_key=KEY, max_retries=0)
        async with api:
            held = [await api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=400,
                                                 stream=True) for _ in range(2)]
            queued = [asyncio.create_task(api.completions.create(
                model=SERVED, prompt=PROMPT, max_tokens=4)) for _ in range(2)]
            async with httpx.AsyncClient(base_url=lm_url, trust_env=False) as http:
                for _ in range(200):  # until both wait in the queue (10 s at most)
                    if "pool_queue_depth 2.0" in (await http.get("/metrics")).text:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the two requests never reached the queue")
            try:
                await api.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4)
            except openai.APIStatusError as exc:
                return exc
            finally:
                for stream in held:
                    await stream.close()
                await asyncio.gather(*queued, return_exceptions=True)
            raise AssertionError("a request beyond the queue was accepted")

    refused = asyncio.run(asyncio.wait_for(fill_then_one_more(), 60))
    assert refused.status_code == 503
    assert int(refused.response.headers["Retry-After"]) >= 1
    assert refused.body["type"] == "server_error"  # type: ignore[index]


@pytest.fixture(scope="module")
def embedder_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("openai-embedder")
    with serve(tmp, WORKER_CLASS="app.examples.text_embedder:TextEmbedder",
               MODEL_NAME="byte-embedder", MODEL_WEIGHTS="random",
               NUM_WORKERS="1") as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        yield url


def test_embeddings_in_float_and_base64_match_the_models_answer(embedder_url):
    texts = ["a cat", "a dog sleeps", "héllo"]
    with httpx.Client(base_url=embedder_url, timeout=60, trust_env=False) as http:
        expected = http.post("/predict", json={"input": texts}).json()
    api = client(embedder_url, key="unused")
    as_floats = api.embeddings.create(model="byte-embedder", input=texts,
                                      encoding_format="float")
    by_default = api.embeddings.create(model="byte-embedder", input=texts)  # base64
    assert [d.index for d in as_floats.data] == [0, 1, 2]
    for got, packed, want in zip(as_floats.data, by_default.data, expected["embeddings"],
                                 strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
        assert packed.embedding == pytest.approx(want, abs=1e-6)
        assert math.isclose(sum(x * x for x in got.embedding), 1.0, rel_tol=1e-4)
    assert as_floats.usage.prompt_tokens == expected["prompt_tokens"] == sum(
        len(t.encode()) for t in texts)
    one = api.embeddings.create(model="byte-embedder", input="a cat", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(expected["embeddings"][0], abs=1e-6)
    raw = httpx.post(f"{embedder_url}/v1/embeddings", timeout=30, json={
        "model": "byte-embedder", "input": ["a cat"], "encoding_format": "base64"}).json()
    vector = struct.unpack("<" + "f" * (len(base64.b64decode(raw["data"][0]["embedding"]))
                                        // 4), base64.b64decode(raw["data"][0]["embedding"]))
    assert list(vector) == pytest.approx(expected["embeddings"][0], abs=1e-6)
    with pytest.raises(openai.NotFoundError):  # an embedder does not write text
        api.completions.create(model="byte-embedder", prompt="a", max_tokens=2)


def test_a_client_that_leaves_a_stream_stops_it(lm_url):
    """The same lifetime as /predict's: the client's disconnect stops the worker's stream
    and is counted as abandoned."""
    def abandoned(http: httpx.Client) -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("http_requests_abandoned_total "):
                return float(line.split()[1])
        return 0.0

    with httpx.Client(base_url=lm_url, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as http:
        before = abandoned(http)
        with http.stream("POST", "/v1/completions", json={
                "model": SERVED, "prompt": PROMPT, "max_tokens": 400, "stream": True}) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: {")
        assert wait_until(lambda: abandoned(http) == before + 1, timeout=10)
