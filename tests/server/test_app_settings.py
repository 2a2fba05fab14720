"""Settings, worker planning and WORKER_CLASS resolution: no processes, no model."""

from __future__ import annotations

import pytest
import torch
from app_helpers import settings
from pydantic import ValidationError

from app.main import load_worker_class, plan_workers
from app.settings import Settings, available_cpus
from app.worker import ViTWorker


def test_cpu_workers_split_the_cores_between_them():
    cpus = available_cpus()
    plan = plan_workers(settings(num_workers=2, device="cpu"))
    assert [c.worker_index for c in plan] == [0, 1]
    assert {c.device for c in plan} == {"cpu"}
    assert {c.num_threads for c in plan} == {max(1, cpus // 2)}
    [only] = plan_workers(settings(num_workers=None, device="cpu"))
    assert only.num_threads == cpus  # the default CPU worker takes every core


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA devices")
def test_device_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="DEVICE=cuda"):
        plan_workers(settings(device="cuda"))


def test_worker_class_is_resolved_and_checked():
    assert load_worker_class("app.worker:ViTWorker") is ViTWorker
    with pytest.raises(ValueError, match="cannot be imported"):
        load_worker_class("app.nowhere:Worker")
    with pytest.raises(ValueError, match="not a subclass"):
        load_worker_class("app.settings:Settings")


def test_environment_variables_are_read_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("API_KEY", "")
    loaded = Settings()
    assert loaded.max_batch_size == 32
    assert loaded.api_key is None  # an empty key must not mean "the empty string is valid"
    monkeypatch.setenv("MODEL_WEIGHTS", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValidationError, match="checkpoint"):
        Settings()
    monkeypatch.setenv("MODEL_WEIGHTS", "random")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", str(200_000_000))  # past where Pillow refuses
    with pytest.raises(ValidationError, match="max_image_pixels"):
        Settings()


@pytest.mark.parametrize("name, value", [
    ("REQUEST_TIMEOUT_S", "inf"), ("REQUEST_TIMEOUT_S", "3000000"),
    ("SHUTDOWN_TIMEOUT_S", "inf"), ("MAX_BATCH_WAIT_MS", "inf"), ("MAX_UPLOAD_MB", "inf")])
def test_endless_durations_and_sizes_are_refused_at_startup(monkeypatch, name, value):
    # Accepted, REQUEST_TIMEOUT_S=inf (or past the ~24 days a deadline can wait) stopped the
    # pool at the first request, for good; MAX_BATCH_WAIT_MS=inf made batches wait forever.
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()
