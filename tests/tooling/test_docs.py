"""The docs tell the truth about their figures: every generated block matches what its command
prints from the committed result files, and every relative link points at a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_figures_match_the_committed_results():
    out = subprocess.run([sys.executable, "benchmarks/render_docs.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, ("run `python benchmarks/render_docs.py`:\n" + out.stdout
                                 + out.stderr)


def test_relative_links_point_at_files():
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
