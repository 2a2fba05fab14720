"""POOL_BACKEND=ray: the server's workers are Ray actors, and the server says where they run.

A local Ray instance (loopback only), started for this module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra stateful-pool[ray]")

from app_helpers import image_bytes, running_app, settings  # noqa: E402

from app.serving import cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support")])
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


def test_plan_one_worker_per_cluster_gpu_else_cpu_workers():
    assert cluster.plan({"GPU": 4.0, "CPU": 32.0}, device="auto", num_workers=None) == (
        4, True, {"num_gpus": 1})
    assert cluster.plan({"GPU": 4.0, "CPU": 32.0}, device="cpu", num_workers=None) == (
        16, False, {"num_cpus": 2})
    assert cluster.plan({"CPU": 8.0}, device="auto", num_workers=2) == (
        2, False, {"num_cpus": 4})
    with pytest.raises(ValueError, match="no GPU"):
        cluster.plan({"CPU": 8.0}, device="cuda", num_workers=None)


def test_server_on_ray_serves_and_shows_where_workers_run(local_ray):
    app_settings = settings(pool_backend="ray", worker_class="app.examples.echo_worker:EchoWorker",
                            num_workers=2)
    with running_app(app_settings, ready_timeout=120) as client:
        data = image_bytes("PNG", (64, 48))
        answer = client.post("/predict", files=[("files", ("a.png", data, "image/png"))])
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["width"] == 64
        info = client.get("/v1/model").json()
        assert info["backend"] == "ray"
        node = ray.get_runtime_context().get_node_id()
        assert [w["node"] for w in info["workers"]] == [node, node]
        assert all(w["host"] for w in info["workers"])
        metrics = client.get("/metrics").text
        assert f'node="{node}"' in metrics and "pool_worker_info" in metrics
