"""The two code blocks of the stateful-pool 0.3.2 README run unchanged on this library."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stderr == ""
    return out.stdout.splitlines()


def test_seed_readme_first_example():
    assert run_example("seed_readme_1.py") == [
        "Worker initialized on GPU: [0, 1]",
        "[Execute] Square of 100 is 10000 (computed on GPU: [0, 1])",
    ]


def test_seed_readme_second_example():
    lines = run_example("seed_readme_2.py")
    assert lines[:2] == ["Worker initialized on GPU: [0, 1]", "Worker initialized on GPU: [2, 3]"]
    pattern = re.compile(
        r"\[Execute\] Square of (\d) is (\d+) \(computed on GPU: \[(0, 1|2, 3)\]\)")
    squares = [pattern.fullmatch(line) for line in lines[2:]]
    assert all(squares) and len(squares) == 4
    assert [(int(m[1]), int(m[2])) for m in squares] == [(i, i * i) for i in range(4)]
