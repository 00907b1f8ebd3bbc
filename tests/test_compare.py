"""benchmarks/compare.py runs all three systems on a tiny workload and prints consistent ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.mark.slow  # minutes: three systems started and loaded in turn
def test_compare_small_run():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "fixed", "--concurrency", "2", "--requests", "2", "--port", "3996"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| fixed | 2 | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, static, cb = (float(c) for c in cells[3:6])
    assert ours > 0 and static > 0 and cb > 0
    assert float(cells[6].rstrip("x")) == pytest.approx(ours / static, rel=0.02)
    assert float(cells[7].rstrip("x")) == pytest.approx(ours / cb, rel=0.02)
    assert re.match(r"machine: .*transformers \d+\.\d+", result.stdout)
    assert "Peak RSS: pytgi shard + router" in result.stdout
