"""benchmarks/cpu_limits.py on a tiny model for a few seconds: every figure measured, every
bound and ratio filled, the CPU named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_limits.py"


@pytest.mark.slow
def test_cpu_limits_fills_every_column(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-id", str(tiny_model_dir), "--scale", "0.06",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "cores" in lines[0] and "float32" in lines[0] and "failures 0" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line]
    figures = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}
    assert len(figures) == 14
    for name, (measured, bound, ratio, goal) in figures.items():
        assert measured and measured[0].isdigit(), name
        if name.startswith(("TPOT", "decode step", "prefill")):
            assert bound[0].isdigit() and ratio[0].isdigit(), name
            assert goal or name.startswith("decode step in-process"), name
