"""Fixtures shared by the server tests."""

from __future__ import annotations

import pytest
from app_helpers import save_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Random-init tiny ViT weights (.safetensors), saved once for the whole run."""
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_checkpoint(path)
    return path
