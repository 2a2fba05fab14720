"""Several models in one server (``MODELS_FILE``), as an operator runs it: ``python -m app``
on a real 127.0.0.1 socket, clients of each protocol, and a reload under load counted by the
clients themselves."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from app_helpers import (
    ROOT,
    TINY,
    http_client,
    image_bytes,
    serve,
    settings,
    wait_ready,
)
from procs import pid_alive, wait_until

from app.serving.models_file import ModelsFileError, read_models_file

KEY = "admin-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}

TWO_MODELS = """
default = "echo"

[models.echo]
worker_class = "app.examples.echo_worker:EchoWorker"
devices = ["cpu"]

[models.sentiment]
worker_class = "app.examples.text:TextClassifier"
weights = "random"
max_batch_size = 4
queue_size = 8
settings = { labels = "spam,ham,eggs", layers = 1, width = 32 }
"""

RELOADABLE = """
[models.loaded]
worker_class = "app_helpers:LoadedNameWorker"
model_name = "first"
weights = "random"
num_workers = 2
queue_size = 512
max_batch_size = 8
"""


def every_worker_ready(http: httpx.Client) -> bool:
    """``/readyz`` is 200 once each model has a worker; a reload waits for all of them."""
    body = http.get("/readyz").json()
    return bool(body.get("workers")) and body.get("workers_ready") == body["workers"]


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.slow
def test_two_models_from_one_file_each_with_its_schema_metrics_and_readiness(tmp_path):
    models = write(tmp_path, TWO_MODELS)
    with serve(tmp_path, MODELS_FILE=str(models)) as (process, url, log), \
            http_client(url) as http:
        wait_ready(http, process, log)
        spec = http.get("/openapi.json").json()
        echo_body = spec["paths"]["/models/echo/predict"]["post"]["requestBody"]
        text_body = spec["paths"]["/models/sentiment/predict"]["post"]["requestBody"]
        assert "multipart/form-data" in echo_body["content"]
        assert "application/json" in text_body["content"]
        assert "/predict" in spec["paths"]  # the default model

        image = image_bytes("PNG", (40, 30))
        echoed = http.post("/models/echo/predict", files={"files": ("a.png", image)})
        assert echoed.status_code == 200, echoed.text
        assert echoed.json()["predictions"][0]["width"] == 40
        assert http.post("/predict", files={"files": ("a.png", image)}).status_code == 200
        labelled = http.post("/models/sentiment/predict", json={"texts": ["hi", "there"]})
        assert labelled.status_code == 200, labelled.text
        assert {p["label"] for p in labelled.json()["predictions"]} <= {"spam", "ham", "eggs"}
        # Each model's own limits: the text model's queue holds 8 items.
        too_many = http.post("/models/sentiment/predict", json={"texts": ["x"] * 9})
        assert too_many.status_code == 413 and "QUEUE_SIZE=8" in too_many.json()["detail"]

        unknown = http.post("/models/nope/predict", json={"texts": ["x"]})
        assert unknown.status_code == 404
        assert "'echo'" in unknown.json()["detail"] and "'sentiment'" in unknown.json()["detail"]
        v2_unknown = http.get("/v2/models/nope")
        assert v2_unknown.status_code == 404 and "'sentiment'" in v2_unknown.json()["error"]

        index = http.post("/v2/repository/index").json()
        assert index == [{"name": "echo", "version": "1", "state": "READY"},
                         {"name": "sentiment", "version": "1", "state": "READY"}]
        assert http.get("/v2/models/sentiment/ready").json() == {"name": "sentiment",
                                                                 "ready": True}
        listed = http.get("/v1/models").json()["data"]
        assert [(m["id"], m["ready"]) for m in listed] == [("echo", True), ("sentiment", True)]
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready"
        assert set(ready["models"]) == {"echo", "sentiment"}
        assert http.get("/models/sentiment").json()["worker_settings"]["labels"] == \
            "spam,ham,eggs"

        metrics = http.get("/metrics").text
        assert 'pool_tasks_total{model="echo",outcome="completed"} 2.0' in metrics
        assert 'pool_tasks_total{model="sentiment",outcome="completed"} 2.0' in metrics
        assert 'pool_queue_depth{model="sentiment"} 0.0' in metrics
        # Both are v2 models, each with its own tensors.
        assert http.get("/v2/models/echo").json()["inputs"] != \
            http.get("/v2/models/sentiment").json()["inputs"]


BAD_FILES = [
    ("", "no [models.NAME] table"),
    ("[models.a\n", "is not valid TOML"),
    ("[models.a]\nworker_class = 'app.examples.echo_worker:EchoWorker'\nbatch = 3\n",
     "[models.a] unknown key(s) batch"),
    ("[models.a]\nmax_batch_size = 0\n", "[models.a] max_batch_size: Input should be greater"),
    ("[models.a]\ndevices = ['cuda:3']\n", "[models.a] devices: cuda:3 does not exist"),
    ("[models.a]\ndevices = ['gpu']\n", "[models.a] devices = ['gpu']"),
    ("[models.a]\ndevices = ['cpu']\nnum_workers = 2\n", "sets both devices and num_workers"),
    ("default = 'b'\n[models.a]\n", "default = 'b' is not one of the models (a)"),
    ("[models.'a/b']\n", "model name 'a/b' must be"),
    ("[models.a]\nweights = 'no/such/file.pth'\n", "[models.a] weights:"),
    ("[models.a]\nsettings = 3\n", "settings must be a table"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_each_bad_models_file_is_refused_naming_the_model_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ModelsFileError) as raised:
        read_models_file(path, settings(), gpu_count=0)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)


def test_a_missing_models_file_and_a_bad_worker_class_stop_the_server_with_exit_code_2(
        tmp_path):
    bad_class = write(tmp_path, "[models.x]\nworker_class = 'app.nothing:Here'\n")
    unknown_setting = write(tmp_path, "[models.t]\nworker_class = "
                            "'app.examples.text:TextClassifier'\nsettings = { colour = 1 }\n",
                            "unknown.toml")
    for path, message in ((tmp_path / "absent.toml", "cannot be read"),
                          (bad_class, "[models.x] WORKER_CLASS='app.nothing:Here' cannot be "
                                      "imported"),
                          (unknown_setting, "settings: unknown key(s) colour")):
        done = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "MODELS_FILE": str(path),
                                   "DEVICE": "cpu", "PORT": "0"})
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and str(path) in done.stderr, done.stderr


async def load(url: str, stop: asyncio.Event, clients: int = 32) -> tuple[list[str], list[str]]:
    """``clients`` keep-alive clients posting until ``stop``; the served model names in
    order of answers, and every failure (status or transport error)."""
    served: list[str] = []
    failures: list[str] = []

    async def client(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False,
                                     headers=AUTH) as http:
            while not stop.is_set():
                try:
                    answer = await http.post("/models/loaded/predict",
                                             json={"texts": [f"c{index}", "x"]})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text}")
                else:
                    served.append(answer.json()["model_name"])

    await asyncio.gather(*(client(i) for i in range(clients)))
    return served, failures


@pytest.mark.slow
def test_a_reload_under_load_fails_no_request_and_new_requests_reach_the_new_model(tmp_path):
    models = write(tmp_path, RELOADABLE)
    with serve(tmp_path, MODELS_FILE=str(models), API_KEY=KEY, PYTHONPATH=str(
            ROOT / "tests" / "support")) as (process, url, log), http_client(url) as http:
        http.headers.update(AUTH)
        wait_ready(http, process, log)
        assert wait_until(lambda: every_worker_ready(http), 60)
        old_pids = {w["pid"] for w in http.get("/models/loaded").json()["workers"]}

        async def scenario() -> tuple[list[str], list[str], httpx.Response]:
            stop = asyncio.Event()
            running = asyncio.ensure_future(load(url, stop))
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False,
                                         headers=AUTH) as admin:
                reloaded = await admin.post("/admin/models/loaded/reload",
                                            json={"model_name": "second"})
            await asyncio.sleep(1.0)
            stop.set()
            served, failures = await asyncio.wait_for(running, 60)
            return served, failures, reloaded

        served, failures, reloaded = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["model_name"] == "second"
        assert failures == []
        assert served.count("first") > 10 and served.count("second") > 10
        # Once the new model answered, no later answer came from the old one.
        assert "first" not in served[served.index("second") + 2 * 32:]
        info = http.get("/models/loaded").json()
        assert info["model"] == "second" and info["ready"]
        answer = http.post("/models/loaded/predict", json={"texts": ["y"]})
        assert answer.json()["model_name"] == "second"
        # The old workers stopped once their last requests were answered.
        assert wait_until(lambda: not any(pid_alive(pid) for pid in old_pids), 30)


def test_admin_routes_are_off_without_an_api_key(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(settings(models_file=str(write(tmp_path, RELOADABLE))))
    client = TestClient(app)  # no lifespan: the key is checked before anything else
    refused = client.post("/admin/models/loaded/reload")
    assert refused.status_code == 403 and "API_KEY" in refused.json()["detail"]


@pytest.mark.slow
def test_reload_needs_the_api_key_names_unknown_models_and_keeps_the_old_model_on_failure(
        tmp_path):
    models = write(tmp_path, RELOADABLE)
    env = {"MODELS_FILE": str(models), "PYTHONPATH": str(ROOT / "tests" / "support")}
    with serve(tmp_path, API_KEY=KEY, **env) as (process, url, log), \
            http_client(url) as http:
        http.headers.update(AUTH)
        wait_ready(http, process, log)
        assert wait_until(lambda: every_worker_ready(http), 60)
        assert http.post("/admin/models/loaded/reload",
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        unknown = http.post("/admin/models/other/reload")
        assert unknown.status_code == 404 and "'loaded'" in unknown.json()["detail"]
        invalid = http.post("/admin/models/loaded/reload", json={"weights": "no/such.pth"})
        assert invalid.status_code == 422
        started = time.monotonic()
        failed = http.post("/admin/models/loaded/reload", json={"model_name": "broken-v2"})
        assert failed.status_code == 500, failed.text
        assert "out of memory" in failed.json()["detail"]
        assert "old ones serve on" in failed.json()["detail"]
        assert time.monotonic() - started < 30
        answer = http.post("/models/loaded/predict", json={"texts": ["z"]})
        assert answer.status_code == 200 and answer.json()["model_name"] == "first"
        # An empty body reloads the same model (new processes, same weights).
        before = {w["pid"] for w in http.get("/models/loaded").json()["workers"]}
        again = http.post("/admin/models/loaded/reload")
        assert again.status_code == 200 and again.json()["model_name"] == "first"
        after = {w["pid"] for w in http.get("/models/loaded").json()["workers"]}
        assert before.isdisjoint(after) and len(after) == 2


def test_a_server_of_one_model_serves_it_under_its_name_too(tmp_path):
    from app_helpers import running_app

    with running_app(settings(worker_class="app.examples.echo_worker:EchoWorker")) as client:
        image = image_bytes("PNG", (20, 10))
        named = client.post(f"/models/{TINY}/predict", files={"files": ("a.png", image)})
        assert named.status_code == 200, named.text
        assert named.json() == client.post("/predict",
                                           files={"files": ("a.png", image)}).json()
        assert "model=" not in client.get("/metrics").text  # one model: no model label
        assert client.post("/v2/repository/index", json={"ready": True}).json() == [
            {"name": TINY, "version": "1", "state": "READY"}]
