"""The GPU path, checked on CPU: device JPEG decoding forced with DECODE=device,
PRECISION=auto, COMPILE=1, and the chunked prepare that overlaps decoding with compute.

The decode comparison runs two workers in this process (no pool) because it compares logits,
which the server does not return; the error and routing cases go through the real app.
"""

from __future__ import annotations

import pytest
import torch
from app_helpers import (
    Reference,
    assert_same_top_k,
    image_bytes,
    image_input,
    running_app,
    settings,
    truncated_jpeg,
    worker_config,
)

from app.contract import InvalidImageError
from app.device_images import decodable_on_device
from app.images import decode_rgb
from app.runtime import TorchSettings, compile_batch_sizes, resolve_precision
from app.worker import ViTWorker

pytestmark = pytest.mark.slow

# Logits of the device path against Pillow's. Measured on the 12 noise JPEGs below (random
# init ViT-Ti, fp32, CPU): at most 4.4e-4 apart, from resized pixels 1-2 levels apart at a
# handful of positions (Pillow rounds between its two resize passes in fixed point, torch in
# float). 2e-3 leaves 4x headroom and is still under half of the smallest top-1/top-2 gap
# among these images (3.0e-3), so a pass here also means the top-1 cannot differ.
LOGIT_ATOL = 2e-3
SIZES = [(320, 240), (200, 180), (640, 480), (97, 131)]
JPEGS = [image_bytes("JPEG", size=SIZES[seed % 4], seed=seed) for seed in range(12)]


def spawn_worker(checkpoint, **torch_settings):
    worker = ViTWorker()
    worker.spawn(worker_config(weights=str(checkpoint), num_threads=torch.get_num_threads(),
                               max_batch_size=8,
                               options=TorchSettings.model_construct(**torch_settings)))
    return worker


def logits(worker, items):
    """The model's logits per item (None for an item that failed), and the chunks formed."""
    errors = [None] * len(items)
    out, chunks = [None] * len(items), []
    with torch.inference_mode():
        for inputs, positions in worker.images.batches(items, errors):
            chunks.append(positions)
            for index, row in zip(positions, worker.forward(inputs), strict=True):
                out[index] = row
    return out, chunks, errors


@pytest.fixture(scope="module")
def pillow_worker(checkpoint):
    # Chunks of 2: the overlap path (Pillow in threads, chunk by chunk) runs on CPU too.
    return spawn_worker(checkpoint, decode="pillow", prepare_chunk=2)


@pytest.fixture(scope="module")
def device_worker(checkpoint):
    return spawn_worker(checkpoint, decode="device")


def test_device_decode_gives_pillow_logits_and_top1(pillow_worker, device_worker):
    items = [image_input(data) for data in JPEGS]
    pillow, pillow_chunks, _ = logits(pillow_worker, items)
    device, device_chunks, _ = logits(device_worker, items)
    assert pillow_chunks == [[2 * i, 2 * i + 1] for i in range(6)]
    assert device_chunks == [list(range(12))], "every JPEG in one device decode"
    for index, (a, b) in enumerate(zip(pillow, device, strict=True)):
        assert torch.allclose(a, b, rtol=0, atol=LOGIT_ATOL), (index, (a - b).abs().max())
        assert a.argmax() == b.argmax(), index


def test_worker_info_names_the_path(pillow_worker, device_worker):
    assert pillow_worker.images.info() == {"decode": "pillow", "prepare_chunk": 2,
                                           "pinned_memory": False}
    assert device_worker.images.info()["decode"] == "device"


def test_answers_match_a_plain_timm_forward_on_both_paths(checkpoint, pillow_worker,
                                                          device_worker):
    """execute_batch end to end: a PNG, a truncated JPEG and JPEGs in one batch."""
    reference = Reference(checkpoint)
    batch = [image_input(JPEGS[0], 3), image_input(image_bytes("PNG", seed=50), 3),
             image_input(truncated_jpeg(), 3), image_input(JPEGS[1], 3)]
    for worker in (pillow_worker, device_worker):
        results = worker.execute_batch(batch)
        assert isinstance(results[2], InvalidImageError)
        assert "truncated" in str(results[2])
        # The PNG went through Pillow on both: the same probabilities as timm's transform.
        assert_same_top_k(results[1]["top_k"], reference.top_k(batch[1].data, 3))
        for index in (0, 3):
            got, expected = results[index]["top_k"], reference.top_k(batch[index].data, 3)
            assert got[0]["class_id"] == expected[0]["class_id"]


def test_device_decoder_takes_plain_jpegs_only(device_worker):
    png = image_input(image_bytes("PNG", seed=51))
    items = [png, image_input(JPEGS[2]), image_input(truncated_jpeg())]
    _, chunks, errors = logits(device_worker, items)
    assert chunks == [[1], [0]], "the JPEG on the device first, then the PNG by Pillow"
    assert isinstance(errors[2], InvalidImageError)
    assert not decodable_on_device(png.data, "PNG")
    assert not decodable_on_device(JPEGS[0], "MPO")  # a phone's multi-picture JPEG: Pillow
    assert not decodable_on_device(truncated_jpeg(), "JPEG")  # no end marker: Pillow refuses


def jpeg_without_scan() -> bytes:
    """Header and end marker intact, no image data: passes the device path's checks, and
    the device decoder fails on it."""
    data = JPEGS[3]
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def test_corrupt_jpeg_on_the_device_path_gets_pillows_400(monkeypatch):
    """Through the app: a batch where the device decoder fails on one JPEG; that request gets
    the 400 it gets with Pillow (same words), the others their answers."""
    bad = jpeg_without_scan()
    assert decodable_on_device(bad, "JPEG")
    with pytest.raises(InvalidImageError) as pillow_error:
        decode_rgb(bad, max_pixels=40_000_000)
    monkeypatch.setenv("DECODE", "device")
    with running_app(settings(max_batch_size=8)) as client:
        [worker] = client.get("/v1/model").json()["workers"]
        assert worker["decode"] == "device"
        responses = [client.post("/predict", files=[("files", ("img0.jpeg", data))])
                     for data in (bad, truncated_jpeg(), JPEGS[4])]
    assert responses[0].status_code == 400
    assert responses[0].json()["detail"] == f"file 1 (img0.jpeg): {pillow_error.value}"
    assert responses[1].status_code == 400
    assert "truncated" in responses[1].json()["detail"]
    assert responses[2].status_code == 200, responses[2].text


def test_bad_decode_setting_stops_the_server_naming_it(monkeypatch):
    from app.serving.plan import make_plan

    monkeypatch.setenv("DECODE", "gpu")
    with pytest.raises(ValueError, match="decode"):
        make_plan(settings())


def test_auto_precision_is_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.float32  # half precision is for GPUs
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)


def test_compile_warms_up_batch_one_and_the_largest_batch():
    assert compile_batch_sizes(1) == [1]
    assert compile_batch_sizes(256) == [1, 256]


@pytest.mark.timeout(600)
def test_compiled_worker_never_compiles_after_spawn(checkpoint, pillow_worker):
    """COMPILE=1 on CPU (inductor, vit_tiny: about a minute on 2 cores): the warm-up at
    spawn compiles; batches of other sizes then reuse its graphs, with the same top-1."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    worker = spawn_worker(checkpoint, decode="pillow", compile=True)
    info_graphs = counters["stats"]["unique_graphs"]
    assert info_graphs == 2, dict(counters["stats"])  # batch 1, and one dynamic batch graph
    for size in (3, 1, 8, 5):
        items = [image_input(data) for data in JPEGS[:size]]
        compiled, _, _ = logits(worker, items)
        eager, _, _ = logits(pillow_worker, items)
        for a, b in zip(compiled, eager, strict=True):
            assert a.argmax() == b.argmax()
            assert torch.allclose(a, b, rtol=0, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == info_graphs, "a request paid for compiling"
