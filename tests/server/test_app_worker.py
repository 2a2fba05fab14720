"""The ViT worker through a bare SPool (no HTTP): batches, per-item failures, .pth weights."""

from __future__ import annotations

import pytest
from app_helpers import (
    Reference,
    assert_same_top_k,
    image_bytes,
    image_input,
    save_checkpoint,
    truncated_jpeg,
    worker_config,
)

from app.contract import InvalidImageError
from app.worker import ViTWorker
from stateful_pool import SPool

pytestmark = pytest.mark.slow


def test_one_batch_with_a_corrupt_image_fails_only_that_item(tmp_path):
    checkpoint = tmp_path / "vit_tiny.pth"
    save_checkpoint(checkpoint)
    reference = Reference(checkpoint)
    good = [image_bytes("JPEG", seed=40), image_bytes("PNG", seed=41)]
    # A batch window long enough that the three submissions surely form one batch; two
    # threads so the images are prepared in parallel, as on a GPU worker.
    with SPool(ViTWorker, max_batch_size=8, max_batch_wait=1.0) as pool:
        info = pool.spawn(worker_config(weights=str(checkpoint), num_threads=2))
        assert info["weights"] == "checkpoint" and info["num_threads"] == 2
        futures = [pool.submit_execute(image_input(data, top_k=k))
                   for data, k in ((good[0], 3), (truncated_jpeg(), 5), (good[1], 7))]
        first, third = futures[0].result(timeout=60), futures[2].result(timeout=60)
        with pytest.raises(InvalidImageError, match="truncated"):
            futures[1].result(timeout=60)
        assert pool.stats().batch_size_hist == {3: 1}
    assert_same_top_k(first["top_k"], reference.top_k(good[0], 3))
    assert_same_top_k(third["top_k"], reference.top_k(good[1], 7))
