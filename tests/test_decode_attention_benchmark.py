"""benchmarks/decode_attention.py on a few small layers: every figure of its table filled."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from shard import cpu_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(cpu_kernels.load() is None, reason="the CPU kernels do not build here")
def test_the_table_has_every_figure():
    import decode_attention

    argv = ["--rounds", "1", "--layers", "2", "--cases", "1x40,3x20"]
    out = decode_attention.main([*argv, "--dtypes", "bfloat16,float32,float8_e4m3fn"])
    rows = [
        line
        for line in out.splitlines()
        if re.match(r"\| (bfloat16|float32|float8_e4m3fn) \|", line)
    ]
    assert [r.split("|")[2].strip() for r in rows] == ["1 x 40", "3 x 20"] * 3
    for row in rows:
        kernel, share, plain, speedup = (row.split("|")[i].strip() for i in (3, 4, 5, 6))
        assert float(kernel) > 0 and float(plain) > 0 and float(speedup.rstrip("x")) > 0
        assert re.fullmatch(r"[0-9.]+ \([0-9]+%\)", share)
    assert "read bandwidth" in out and "9 query heads over 3 KV heads of 64" in out
