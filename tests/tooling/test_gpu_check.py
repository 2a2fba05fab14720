"""loadtest/gpu_check.sh, the one script a GPU machine runs, kept from rotting:
its CPU smoke mode end to end, and its wheel install in the device runner's layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "loadtest" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_mode_runs_every_step_and_returns_few_files(tmp_path):
    """vit_tiny on CPU: every bare-model setting, both decode paths at both user counts.
    About 60-90 s on 2 cores: 4 bare-model processes start, two at a time, then 2 servers of
    2 workers each."""
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"] == []
    assert list(results["raw_model"]) == ["fp32", "tf32", "bf16", "bf16+compile"]
    for name, raw in results["raw_model"].items():
        assert set(raw["images_per_s_by_batch"]) == {"1", "2"}, (name, raw)
        assert min(raw["images_per_s_by_batch"].values()) > 0
    assert results["raw_model"]["bf16+compile"]["compiled"] is True
    runs = {(r["decode"], r["users"]): r for r in results["server"]}
    assert set(runs) == {(d, u) for d in ("device", "pillow") for u in (2, 4)}, runs
    for (decode, _), run in runs.items():
        assert run["worker_decode"] == decode, "DECODE did not reach the worker"
        assert run["failures"] == 0, run
    for decode in ("device", "pillow"):  # a 3 s run on 2 busy cores may catch no answer
        assert runs[(decode, 2)]["requests"] + runs[(decode, 4)]["requests"] > 0, runs
    table = (out / "results.md").read_text()
    assert "SMOKE: CPU dry run, not a measurement" in table
    assert "| bf16+compile |" in table and "| device (worker: device) | 4 |" in table
    # The device runner returns at most 8 files, 2 folders deep: the rest is packed.
    assert sorted(p.name for p in out.iterdir()) == [
        "check.log", "details.tgz", "results.json", "results.md"]
    with tarfile.open(out / "details.tgz") as archive:
        names = archive.getnames()
    assert "details/server_device.log" in names and "details/raw_bf16_compile.json" in names


def test_wheels_carried_as_dot_whl_are_installed_and_put_on_the_path(tmp_path):
    """The checkout is the repository root and the missing wheels are in .whl/. A stand-in
    python records what the script asks of it."""
    repo = tmp_path / "repo"
    (repo / "loadtest").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "loadtest" / "gpu_check.sh")
    (repo / ".whl").mkdir()
    (repo / ".whl" / "fastapi-0-py3-none-any.whl").write_bytes(b"")
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$* | PYTHONPATH=${{PYTHONPATH:-}}" >> {calls}
[ "$1" = -c ] && exit 1  # fastapi and friends are missing, as on the GPU machine
exit 0
""")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("WHEELS", "PYTHONPATH", "SMOKE")}
    done = subprocess.run(["bash", str(repo / "loadtest" / "gpu_check.sh"), "--budget", "9"],
                          env={**env, "PYTHON": str(fake), "OUT": str(tmp_path / "out")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    install, run = calls.read_text().splitlines()[1:]
    assert install.startswith("-m pip install -q --no-index --no-deps --no-compile --upgrade "
                              "--target /tmp/site .whl/fastapi-0-py3-none-any.whl")
    assert run.startswith(f"-m loadtest.gpu_check --output {tmp_path / 'out'} --budget 9")
    assert run.endswith(f"PYTHONPATH={repo}:/tmp/site")
