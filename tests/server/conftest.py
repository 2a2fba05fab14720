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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 and its tokenizer (with a chat template), written once for the
    whole run: a causal language model to serve offline."""
    from app.examples.causal_lm import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny-lm")))
