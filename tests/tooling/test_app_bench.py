"""benchmarks/server_bench.py still runs end to end (tiny phases; the figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_server_bench_quick_echo_writes_its_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/server_bench.py", "--quick", "--only", "echo",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| echo worker, 8 clients | plain FastAPI req/s |" in result.stdout
    assert "| echo worker, 8 clients | seed shape on SPool req/s |" in result.stdout
    assert "| server | req/s | p99 | API CPU per request |" in result.stdout
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert [(row["baseline"], row["goal"]) for row in rows] == [
        ("plain FastAPI req/s", 0.5), ("seed shape on SPool req/s", 0.9)]
    for row in rows:
        assert row["baseline_rate"] > 0 and row["server_rate"] > 0
        assert row["baseline_p99_ms"] > 0 and row["server_p99_ms"] > 0
        assert all(phase["errors"] == 0 for phase in row["phases"])
    # Every server's API process CPU per request, and the ratios against the plain endpoint
    # (the 0.3.2 server is there when its package could be installed).
    sides = saved["api_cpu"]["sides"]
    assert {"plain FastAPI", "seed shape (SPool)", "/predict echo"} <= set(sides)
    for side in sides.values():
        assert side["cpu_us_per_request"] > 0 and side["cpu_vs_plain"] > 0
