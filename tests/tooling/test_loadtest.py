"""loadtest/: the report maths, the locust user's answer checks, and the whole runner.

locust monkey-patches whatever process imports it, so it is only ever run as a subprocess;
the runner itself is driven in-process so every server and locust run it starts is a child
of this test process, where the leak fixture of conftest.py can see it.
"""

from __future__ import annotations

import email
import io
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from procs import pid_alive, wait_until

from loadtest import compare, presets, processes, report, results, servers, session
from loadtest.images import (
    generated_images,
    multipart_body,
    request_bodies,
    uni_colour_images,
)
from loadtest.rounds import alternate, medians

ALL_SERVERS = ("simple", "mp", "spool", "spool-batch", "spool-min")


# ---- report maths -------------------------------------------------------------------------

def test_percentile_from_locust_histogram_with_string_keys():
    histogram = {"10": 50, "20": 45, "300": 4, "1000": 1}  # JSON keys are strings
    assert results.percentile(histogram, 0.50) == 10
    assert results.percentile(histogram, 0.95) == 20
    assert results.percentile(histogram, 0.99) == 300
    assert results.percentile(histogram, 1.00) == 1000
    assert math.isnan(results.percentile({}, 0.5))


def stats_entry(**overrides):
    entry = {"name": "/predict", "method": "POST", "num_requests": 100, "num_failures": 10,
             "start_time": 1000.0, "last_request_timestamp": 1010.0,
             "total_response_time": 25000, "response_times": {"200": 90, "500": 10}}
    entry.update(overrides)
    return entry


def test_run_result_counts_only_successful_requests_over_the_measured_window():
    info = {"stopped_at": 1010.0, "errors": {"HTTP 503": 7, "HTTP 500": 3}}
    run = results.run_result([stats_entry(last_request_timestamp=1004.0)], info, server="simple",
                            images_per_request=4, repeat=1, planned_duration_s=15,
                            load_average_1m=0.5)
    # 90 answered between the stats reset and the stop: 10 s, not -t (15 s), nor the 4 s to
    # the last answer.
    assert run.requests_per_s == pytest.approx(9.0)
    assert run.images_per_s == pytest.approx(36.0)
    assert run.latency_mean_ms == 250
    assert (run.latency_p50_ms, run.latency_p99_ms) == (200, 500)
    assert run.top_error == "HTTP 503"


def test_run_without_answers_reports_zero_throughput_not_a_crash():
    run = results.run_result([], {}, server="mp", images_per_request=1, repeat=1,
                            planned_duration_s=5, load_average_1m=0.0)
    assert (run.requests, run.images_per_s) == (0, 0.0)
    assert math.isnan(run.latency_p99_ms)


def test_aggregate_mean_and_sample_std_over_repeats():
    runs = [results.run_result([stats_entry(num_failures=f)], {"stopped_at": 1010.0},
                              server="spool",
                              images_per_request=1, repeat=i, planned_duration_s=10,
                              load_average_1m=0.0)
            for i, f in enumerate((0, 20), 1)]
    (agg,) = results.aggregate(runs)
    assert agg.requests_per_s == pytest.approx(9.0)  # mean of 10 and 8
    assert agg.requests_per_s_std == pytest.approx(math.sqrt(2))
    assert (agg.repeats, agg.requests, agg.failures) == (2, 200, 20)


def test_verdict_needs_both_more_throughput_and_a_lower_p99():
    def agg(server, images_per_s, p99):
        return results.Aggregate(server, 1, 3, 100, 0, images_per_s, 0, 0, 0, 0, 0, 0, 0,
                                p99, 0)

    aggregates = [agg("simple", 40, 900), agg("mp", 50, 800), agg("spool", 55, 850),
                  agg("spool-batch", 160, 500)]
    lines = report.verdicts(aggregates)
    assert lines[0].startswith("1 image(s)/request, spool: vs mp")  # the better baseline
    assert lines[0].endswith("cpu target NOT met")  # faster, but its p99 is higher
    assert lines[1].endswith("cpu target met")
    gpu = report.verdicts(aggregates, {"best_images_per_s": 250}, gpu=True)
    assert gpu[1] == ("1 image(s)/request, spool-batch: vs mp (the better baseline): images/s "
                      "x3.20, p99 x0.62; gpu target (>= x3) met; x0.64 of the bare model; "
                      "gpu target (>= x0.8) NOT met")


def test_code_lines_skip_docstrings_comments_and_blank_lines(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""Module doc\nover two lines."""\n\n# a comment\nimport os\n\n\n'
                      'def f(x):\n    """Doc."""\n    return (x +\n            1)  # why\n')
    assert results.code_lines(source) == 4  # import, def, and the two lines of the return


def test_multipart_body_holds_every_image_under_files():
    uploads = generated_images(3, (64, 48))
    body, content_type = multipart_body(uploads)
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = message.get_payload()
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["files"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [u.data for u in uploads]
    assert len(request_bodies(uploads, 5, variants=4)) == 4


def test_presets_and_overrides():
    args = presets.parse_args(["--preset", "gpu", "--users", "7", "--servers", "mp,spool"])
    assert (args.model, args.users, args.repeats) == ("vit_large_patch16_224", 7, 5)
    assert args.images_per_request == [1, 4, 8, 16, 32]
    assert args.servers == ["mp", "spool"]
    cpu = presets.parse_args(["--images-per-request", "2,8"])
    assert (cpu.model, cpu.workers, cpu.images_per_request) == ("vit_tiny_patch16_224", 2, [2, 8])
    with pytest.raises(SystemExit):
        presets.parse_args(["--servers", "simple,nginx"])


def test_server_limits_leave_room_for_the_whole_load():
    args = presets.parse_args(["--preset", "gpu"])
    env = compare.server_env(args, largest_upload=2**20)
    assert int(env["QUEUE_SIZE"]) >= args.users * 32  # one task per image in flight
    assert int(env["MAX_FILES"]) >= 32
    assert float(env["MAX_UPLOAD_MB"]) >= 32


def test_server_settings_left_in_the_shell_do_not_reach_the_servers(monkeypatch, tmp_path):
    monkeypatch.setenv("NUM_WORKERS", "7")
    monkeypatch.setenv("max_batch_size", "3")  # Settings reads names in any case
    specs = servers.server_specs(max_batch_size=16, max_batch_wait_ms=0)
    args = presets.parse_args(["--preset", "gpu"])  # workers 0: one per GPU
    env = compare.server_env(args, largest_upload=1000)
    simple = servers.ServerProcess(specs["simple"], env, tmp_path / "log").env
    batch = servers.ServerProcess(specs["spool-batch"], env, tmp_path / "log").env
    assert "NUM_WORKERS" not in simple and "max_batch_size" not in simple
    assert batch["MAX_BATCH_SIZE"] == "16" and batch["HOST"] == "127.0.0.1"


# ---- the harness: children in process groups, contestants in turns ------------------------

# A child that starts a grandchild, says its pid, and sleeps: what locust and the seed client
# do with their user processes.
PARENT_OF_A_SLEEPER = ("import subprocess, sys, time\n"
                       "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                       "time.sleep(60)'])\n"
                       "print(child.pid, flush=True)\n"
                       "time.sleep(60)\n")


class Abandoned(Exception):
    pass


def test_leaving_a_logged_process_early_kills_all_it_started(tmp_path):
    log = tmp_path / "child.log"
    with pytest.raises(Abandoned), processes.logged_process(
            [sys.executable, "-c", PARENT_OF_A_SLEEPER], log) as child:
        assert wait_until(lambda: log.read_text().strip(), timeout=30), log.read_text()
        grandchild = int(log.read_text())
        raise Abandoned  # a time-out or Ctrl-C in the caller
    assert child.returncode == -signal.SIGKILL
    assert wait_until(lambda: not pid_alive(grandchild), timeout=5)


def test_run_logged_returns_the_exit_code_and_logs_both_streams(tmp_path):
    log = tmp_path / "run.log"
    code = processes.run_logged(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
         "sys.exit(3)"], log, timeout=30)
    assert code == 3
    assert log.read_text().split() == ["out", "err"]
    assert processes.log_tail(log, lines=1) == "err"
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], log,
                             timeout=0.5)


def test_contestants_take_turns_and_medians_drop_the_spoilt_round():
    calls, printed = [], []

    def contestant(name, figures):
        def measure(round_):
            calls.append((name, round_))
            return figures[round_ - 1]
        return measure

    rounds = alternate({"base": contestant("base", [10, 11, 12]),
                        "cand": contestant("cand", [20, 2, 22])}, 3, after_round=printed.append)
    assert calls == [("base", 1), ("cand", 1), ("base", 2), ("cand", 2), ("base", 3),
                     ("cand", 3)]
    assert rounds == {"base": [10, 11, 12], "cand": [20, 2, 22]}
    assert printed == [{"base": 10, "cand": 20}, {"base": 11, "cand": 2},
                       {"base": 12, "cand": 22}]
    assert medians([{"rate": r, "p99": 100 - r} for r in rounds["cand"]]) == {
        "rate": 20, "p99": 80}


# ---- the locust user, against a stub server -----------------------------------------------

class StubPredict(BaseHTTPRequestHandler):
    """Answers /predict with one prediction per file, minus ``missing``."""

    missing = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        count = body.count(b'name="files"') - self.missing
        payload = json.dumps({"predictions": [{"top_k": [{"class_id": 1}]}] * count}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    def start(missing):
        handler = type("Handler", (StubPredict,), {"missing": missing})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers = []
    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def locust_args(**overrides):
    values = dict(users=2, duration=2.0, image_size="64x48", image_dir="")
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("missing, all_fail", [(0, False), (1, True)])
def test_locust_user_fails_requests_without_one_prediction_per_image(
        stub_server, tmp_path, missing, all_fail):
    url = stub_server(missing)
    stats, info = session.run_locust(url, 3, locust_args(), tmp_path / "run")
    (entry,) = stats
    errors = info["errors"]
    assert entry["num_requests"] > 0
    assert entry["start_time"] < info["stopped_at"]
    if all_fail:
        assert entry["num_failures"] == entry["num_requests"]
        assert list(errors) == ["POST /predict: 2 predictions for 3 images"]
    else:
        assert entry["num_failures"] == 0 and errors == {}


# ---- the runner, end to end ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compare_runs_every_server_without_a_failed_request(tmp_path, capsys):
    out = tmp_path / "results"
    code = compare.main([
        "--servers", ",".join(ALL_SERVERS), "--users", "4", "--duration", "3",
        "--repeats", "1", "--images-per-request", "2", "--image-size", "96x64",
        "--ready-timeout", "60", "--raw-batch-sizes", "1,2", "--raw-seconds", "0.5",
        "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    summary = json.loads((out / "summary.json").read_text())
    for name in ALL_SERVERS:
        server = summary["servers"][name]
        assert "error" not in server, server
        assert server["exit_code"] == 0, f"{name} did not stop cleanly on SIGTERM"
        assert "killed_leftover_pids" not in server, f"{name} left workers behind"
        assert summary["code_size"][name]["code_lines"] > 0
        (run,) = [r for r in summary["runs"] if r["server"] == name]
        assert run["requests"] > 0 and run["failures"] == 0, run
        assert run["images_per_s"] > 0
        assert (out / "raw" / f"{name}_ipr2_r1.json").is_file()
        assert (out / "raw" / f"{name}.server.log").is_file()
        assert f"[{ALL_SERVERS.index(name) + 1}/5] {name} 2 img/req" in printed
    assert len(summary["aggregates"]) == len(ALL_SERVERS)
    assert summary["raw_model"]["best_images_per_s"] > 0, summary["raw_model"]
    for name in ("summary.csv", "runs.csv"):
        assert len((out / name).read_text().splitlines()) == 1 + len(ALL_SERVERS)
    table = (out / "results.md").read_text()
    assert all(f"| {name} | 2 |" in table for name in ALL_SERVERS)
    assert "Bare model (forward pass only" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `python -m loadtest.report DIR` redraws both from summary.json alone.
    (out / "chart.png").unlink()
    (out / "results.md").unlink()
    report.redraw(out)
    assert (out / "results.md").read_text() == table
    assert (out / "chart.png").is_file()


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
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    args = SimpleNamespace(requests=12, users=4, image_kind="uni-colour", image_size="224x224",
                           run_timeout=30.0, image_dir="")
    try:
        result = session.run_seed_client(f"http://127.0.0.1:{server.server_address[1]}", 3,
                                         args, tmp_path / "run")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
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
