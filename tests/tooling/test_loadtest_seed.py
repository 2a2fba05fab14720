"""loadtest/: stateful-pool 0.3.2's own benchmark as it was run (the ``seed`` preset): its
servers, its client, its model and its claim, each against what the 0.3.2 README says."""

from __future__ import annotations

import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from stubs import StubPredict, serving

from loadtest import compare, presets, report, results, servers, session
from loadtest.images import (
    multipart_body,
    uni_colour_images,
)

# ---- stateful-pool 0.3.2's benchmark, as it was run ---------------------------------------

SEED_SERVERS = ("seed-simple", "seed-mp", "seed-spool", "dp")


def test_seed_preset_is_the_seed_benchmark_as_run():
    args = presets.parse_args(["--preset", "seed"])
    assert args.servers == list(SEED_SERVERS)
    assert (args.model, args.weights, args.precision) == ("torchvision:vit_l_16", "random",
                                                           "fp32")
    assert (args.load, args.users, args.requests, args.repeats) == ("seed", 16, 64, 5)
    assert args.images_per_request == [1, 4, 8, 16, 32]
    assert (args.image_kind, args.image_size) == ("uni-colour", "224x224")
    assert args.sequential and not args.raw_model
    assert compare.server_env(args, 1000)["MODEL_NAME"] == "torchvision:vit_l_16"


def test_seed_servers_and_dp_are_accepted_next_to_ours():
    args = presets.parse_args(["--servers", "simple,dp,seed-mp", "--model",
                               "timm:vit_tiny_patch16_224"])
    assert args.servers == ["simple", "dp", "seed-mp"] and args.load == "locust"
    # app/ takes bare timm names.
    assert compare.server_env(args, 1000)["MODEL_NAME"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "seed", "--servers", "seed-spool,spool-batch"], "load timm models only"),
    (["--preset", "seed", "--raw-model"], "the bare-model timing"),
    (["--preset", "seed", "--precision", "bf16"], "fp32 only"),
    (["--preset", "seed", "--model", "keras:vit"], "torchvision:NAME, timm:NAME"),
    (["--preset", "seed", "--requests", "0"], "--requests must be >= 1"),
    (["--image-size", "224"], "WxH"),
])
def test_seed_preset_refuses_what_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        presets.parse_args(argv)
    assert message in capsys.readouterr().err


def test_uni_colour_images_are_one_colour_pngs_of_the_seed_size():
    from PIL import Image

    uploads = uni_colour_images(4)
    colours = set()
    for upload in uploads:
        with Image.open(io.BytesIO(upload.data)) as image:
            assert (image.format, image.size) == ("PNG", (224, 224))
            assert len(image.getcolors()) == 1
            colours.add(image.getpixel((0, 0)))
        assert upload.content_type == "image/png"
    assert len(colours) == 4


def test_seed_model_is_seeded_torchvision_with_the_seed_preprocessing():
    """The replica's answer equals torchvision built and run by hand as the seed did."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    from loadtest.seed.model import BadImage, SeedModel

    upload = uni_colour_images(1)[0]
    replica = SeedModel("torchvision:squeezenet1_1")
    (answer,) = replica.process([upload.data])

    torch.manual_seed(42)
    network = torchvision.models.squeezenet1_1(weights=None).eval()
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        image = Image.open(io.BytesIO(upload.data)).convert("RGB")
        probabilities = network(preprocess(image)[None]).softmax(-1)[0]
    assert answer["class_id"] == int(probabilities.argmax())
    assert answer["score"] == pytest.approx(float(probabilities.max()), rel=1e-5)

    with pytest.raises(BadImage, match="file 2 is not an image"):
        replica.process([upload.data, b"not an image"])


class SlowStub(StubPredict):
    """StubPredict that takes ``delay`` seconds and notes the most requests it held at once."""

    delay = 0.2
    state: dict = {}

    def do_POST(self):  # noqa: N802
        with self.state["lock"]:
            self.state["now"] += 1
            self.state["peak"] = max(self.state["peak"], self.state["now"])
        time.sleep(self.delay)
        with self.state["lock"]:
            self.state["now"] -= 1
        super().do_POST()


@pytest.mark.parametrize("missing", [0, 1])
def test_seed_client_keeps_its_clients_busy_and_checks_every_answer(tmp_path, missing):
    state = {"lock": threading.Lock(), "now": 0, "peak": 0}
    handler = type("Handler", (SlowStub,), {"missing": missing, "state": state})
    args = SimpleNamespace(requests=12, users=4, image_kind="uni-colour", image_size="224x224",
                           run_timeout=30.0, image_dir="")
    with serving(handler) as url:
        result = session.run_seed_client(url, 3, args, tmp_path / "run")
    assert (result["requests"], result["clients"], len(result["latencies_ms"])) == (12, 4, 12)
    assert state["peak"] == 4  # four clients, each with one request in flight
    assert min(result["latencies_ms"]) >= 200
    # 12 requests of 0.2 s, 4 at a time: 3 rounds, not 12 one after the other.
    assert 0.6 <= result["wall_s"] < 2.4
    if missing:
        assert result["failures"] == 12
        assert result["errors"] == {"2 predictions for 3 images": 12}
    else:
        assert result["failures"] == 0 and result["errors"] == {}
    run = results.seed_run_result(result, server="x", repeat=1, load_average_1m=0.0)
    assert run.requests_per_s == pytest.approx((12 - result["failures"]) / result["wall_s"])


def test_seed_client_refuses_a_target_that_is_not_this_machine():
    from loadtest.seed import client

    with pytest.raises(ValueError, match="loopback"):
        client.run("http://example.com/predict", uni_colour_images(1), 1, 1, 1)


def test_seed_run_figures_are_over_the_wall_time_of_a_fixed_request_count():
    doc = {"images_per_request": 4, "requests": 10, "failures": 2, "wall_s": 4.0,
           "latencies_ms": [100.0] * 8 + [400.0, 1000.0], "errors": {"HTTP 500: x": 2}}
    run = results.seed_run_result(doc, server="seed-mp", repeat=2, load_average_1m=1.0)
    assert run.requests_per_s == pytest.approx(2.0)  # 8 answered in 4 s
    assert run.images_per_s == pytest.approx(8.0)
    assert run.latency_mean_ms == pytest.approx(220.0)
    assert (run.latency_p50_ms, run.latency_p95_ms, run.latency_p99_ms) == (100, 1000, 1000)
    assert run.top_error == "HTTP 500: x"
    other = results.seed_run_result({**doc, "failures": 0, "wall_s": 2.0}, server="seed-mp",
                                   repeat=1, load_average_1m=1.0)
    (agg,) = results.aggregate([run, other])
    assert agg.requests_per_s == pytest.approx(3.5)  # mean of 2 and 5 requests/s
    assert agg.requests_per_s_std == pytest.approx(math.sqrt(4.5))
    assert agg.latency_mean_ms_std == 0.0


def test_seed_claim_is_checked_against_the_two_published_baselines():
    def agg(server, images_per_s, latency_std):
        return results.Aggregate(server, 8, 5, 320, 0, images_per_s, 1, 0, 0, 0, 0, 0, 0, 0, 0,
                                500, latency_std)

    holds = report.seed_claim([agg("seed-simple", 100, 40), agg("seed-mp", 90, 30),
                               agg("seed-spool", 131, 10), agg("dp", 140, 5)])
    assert holds == ["8 image(s)/request: seed-spool images/s x1.31 vs seed-simple, x1.46 vs "
                     "seed-mp, x0.94 vs dp; the claim (x1.3 vs seed-simple and seed-mp) holds "
                     "here; std of the mean latency over runs (ms): seed-spool 10, seed-simple "
                     "40, seed-mp 30, dp 5"]
    (fails,) = report.seed_claim([agg("seed-simple", 110, 40), agg("seed-spool", 131, 10)])
    assert "does not hold" in fails


def post_images(url, images, timeout=60):
    body, content_type = multipart_body(images)
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_seed_mp_answers_400_to_a_bad_image_and_its_pipe_keeps_serving(tmp_path):
    """A failed request must not leave an answer behind in the worker's pipe."""
    from loadtest.images import Upload

    spec = servers.server_specs(1, 0)["seed-mp"]
    env = {"MODEL_NAME": "vit_tiny_patch16_224", "DEVICE": "cpu", "NUM_WORKERS": "1",
           "LOG_LEVEL": "warning"}
    server = servers.ServerProcess(spec, env, tmp_path / "server.log")
    server.start()
    try:
        assert server.wait_ready(90)["workers"] == 1
        good = uni_colour_images(2)
        bad = Upload("notes.png", b"these are not pixels", "image/png")
        status, body = post_images(server.url, [good[0], bad])
        assert status == 400 and body["detail"].startswith("file 2 is not an image"), body
        status, first = post_images(server.url, good)
        assert status == 200 and len(first["predictions"]) == 2
        status, again = post_images(server.url, good[:1])
        assert status == 200 and again["predictions"] == first["predictions"][:1]
    finally:
        returncode, leftovers = server.stop()
    assert returncode == 0, server.log_tail()
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_seed_preset_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "seed"
    code = compare.main([
        "--preset", "seed", "--device", "cpu", "--workers", "2",
        "--model", "vit_tiny_patch16_224", "--repeats", "1", "--images-per-request", "1,2",
        "--requests", "16", "--ready-timeout", "90", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["load"] == "seed"
    assert summary["config"]["image_source"] == "uni-colour 224x224 PNGs"
    for name in SEED_SERVERS:
        server = summary["servers"][name]
        assert "error" not in server, server
        assert server["exit_code"] == 0, f"{name} did not stop cleanly on SIGTERM"
        assert "killed_leftover_pids" not in server, f"{name} left workers behind"
        assert server["workers"] == (1 if name == "dp" else 2)
        for ipr in (1, 2):
            (run,) = [r for r in summary["runs"]
                      if r["server"] == name and r["images_per_request"] == ipr]
            assert (run["requests"], run["failures"]) == (16, 0), run
            assert run["images_per_s"] == pytest.approx(run["requests_per_s"] * ipr)
            client = json.loads((out / "raw" / f"{name}_ipr{ipr}_r1.json").read_text())
            assert (client["clients"], len(client["latencies_ms"])) == (16, 16)
    # One server at a time, as the seed ran them: all of seed-simple's runs come first.
    assert [r["server"] for r in summary["runs"]][:2] == ["seed-simple"] * 2
    assert {a["server"] for a in summary["aggregates"]} == set(SEED_SERVERS)
    assert all(a["latency_mean_ms"] > 0 for a in summary["aggregates"])
    table = (out / "results.md").read_text()
    assert "| latency ms (mean) |" in table
    assert table.count("image(s)/request: seed-spool images/s") == 2
    assert "- code: seed-spool" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.redraw(out)
    assert (out / "results.md").read_text() == table


def test_seed_servers_plan_one_replica_per_gpu_or_num_workers(monkeypatch):
    import torch

    from loadtest.seed.serving import devices

    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.delenv("NUM_WORKERS", raising=False)
    assert devices() == ["cpu"]
    monkeypatch.setenv("NUM_WORKERS", "3")
    assert devices() == ["cpu"] * 3
    monkeypatch.setenv("NUM_WORKERS", "0")
    with pytest.raises(ValueError, match="NUM_WORKERS must be >= 1"):
        devices()
    # The planning alone, as on a 2-GPU machine (no GPU is touched).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("DEVICE", "auto")
    monkeypatch.delenv("NUM_WORKERS")
    assert devices() == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("NUM_WORKERS", "3")
    assert devices() == ["cuda:0", "cuda:1", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no GPU"):
        devices()
