"""loadtest/: the report maths, the locust user's answer checks, and the whole runner.

locust monkey-patches whatever process imports it, so it is only ever run as a subprocess;
the runner itself is driven in-process so every server and locust run it starts is a child
of this test process, where the leak fixture of conftest.py can see it.
"""

from __future__ import annotations

import email
import json
import math
import signal
import subprocess
import sys
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
from procs import pid_alive, wait_until
from stubs import StubPredict, serving

from loadtest import compare, presets, processes, report, results, servers, session
from loadtest.images import (
    generated_images,
    multipart_body,
    request_bodies,
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

@pytest.fixture
def stub_server():
    with ExitStack() as stack:
        yield lambda missing: stack.enter_context(
            serving(type("Handler", (StubPredict,), {"missing": missing})))


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
        "--ready-timeout", "60", "--raw-batch-sizes", "1,2", "--raw-seconds", "0.1",
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
