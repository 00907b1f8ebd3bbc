"""The router's event loop, and benchmarks/router_throughput.py (the router against a stub
shard) run for a few seconds: every request served, every column filled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from router.cli import run_loop
from tests.conftest import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "router_throughput.py"


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_router_runs_on_uvloop_where_installed_and_on_asyncio_without(monkeypatch):
    assert run_loop(_loop_module()).startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # its import now raises ImportError
    assert run_loop(_loop_module()).startswith("asyncio")


def test_router_throughput_against_the_stub_shard_fills_every_column():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--concurrency", "1", "4", "--new-tokens", "16",
         "--seconds", "20", "--port", str(free_port())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert "router µs CPU / token" in rows[0][2]
    figures = {int(cells[0]): [float(c) for c in cells[1:]] for cells in rows[1:]}
    assert set(figures) == {1, 4}
    for tok_s, router, stub, client, failed in figures.values():
        assert failed == 0 and tok_s > 0 and router > 0 and stub > 0 and client > 0
