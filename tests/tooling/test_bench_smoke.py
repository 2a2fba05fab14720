"""`make bench` keeps working: a tiny run of benchmarks/pool_bench.py (speed is not asserted
here; figures come from full runs, see README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pool_bench_quick_run_prints_every_row(tmp_path):
    out_json = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pool_bench.py"), "--quick", "--no-seed",
         "--rounds", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("trivial execute latency", "20k trivial submit_execute", "async_execute",
                "8 workers x 10 ms", "1 MiB argument", "max_batch_size", "Lone task"):
        assert row in result.stdout, row
    figures = json.loads(out_json.read_text())["median"]
    assert figures["spool"]["utilisation_8x10ms"] > 0.3
    assert figures["spool"]["batch32_mean_size"] > 1
